#include "model/model.h"

#include "runtime/backend.h"
#include "common/error.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf/gguf_meta.h"
#include "model/repack.h"

#include <algorithm>
#include <cstring>

mllama_model::~mllama_model() {
    for (ggml_backend_buffer * buf : buffers) ggml_backend_buffer_free(buf);
    for (ggml_context * ctx : contexts) ggml_free(ctx);
}

namespace mllama {

static ggml_context * new_descriptor_context(size_t n_tensors) {
    ggml_init_params params = {/*mem_size =*/ggml_tensor_overhead() * (n_tensors + 1), /*mem_buffer =*/nullptr, /*no_alloc =*/true};
    ggml_context * ctx = ggml_init(params);
    if (!ctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create a ggml context for %zu tensors", n_tensors);
    return ctx;
}

static void check_token_ids(const hparams & hp, int64_t n_vocab_embd) {
    const std::pair<const char *, int64_t> ids[] = {{"image", hp.tokens.image}, {"bos", hp.tokens.bos}, {"eos", hp.tokens.eos},
                                                    {"eot", hp.tokens.eot}, {"eom", hp.tokens.eom}, {"pad", hp.tokens.pad}};
    for (const auto & [what, id] : ids) {
        if (id >= n_vocab_embd) fail(MLLAMA_ERR_MODEL, "%s token id %lld has no embedding row (%lld rows)", what, (long long) id, (long long) n_vocab_embd);
    }
    if (hp.tokens.n_tokens > n_vocab_embd) {
        fail(MLLAMA_ERR_MODEL, "the tokenizer has %lld tokens but token_embd.weight only %lld rows", (long long) hp.tokens.n_tokens, (long long) n_vocab_embd);
    }
}

// Allocate one context's tensors: CPU tensors point into the file mappings when mmap is on, else a
// buffer of the device is allocated and the data copied in.
// Quantized text matrices that ggml multiplies faster from its repacked layout go there (copied out
// of the mapping, whose pages are then released); the embedding table stays (it is read by rows).
static void allocate_repacked(mllama_model & m, ggml_context * ctx, const tensor_loader & loader) {
    std::vector<ggml_tensor *> candidates;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        if (t != m.text.token_embd && ggml_is_quantized(t->type)) candidates.push_back(t);
    }
    const std::vector<ggml_tensor *> weights = repackable(candidates);
    for (ggml_tensor * t : weights) {
        const tensor_source & src = loader.source(t);
        m.repacked[ggml_get_name(t)] = file_span{src.file, src.file->data_offset(src.name)};
    }
    if (ggml_backend_buffer_t buf = load_repacked(weights, m.repacked, m.params.n_threads)) m.buffers.push_back(buf);
}

static void allocate(mllama_model & m, ggml_context * ctx, ggml_backend_dev_t dev, bool use_mmap, const tensor_loader & loader) {
    if (!ggml_get_first_tensor(ctx)) return;
    if (use_mmap && is_cpu(dev)) {
        allocate_repacked(m, ctx, loader);
        for (const auto & file : m.files) {
            size_t max_size = 0;
            for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
                if (!t->buffer && loader.source(t).file == file.get()) max_size = std::max(max_size, ggml_nbytes(t));
            }
            if (max_size == 0) continue;
            uint8_t * base = const_cast<uint8_t *>(file->mapping());
            ggml_backend_buffer_t buf = ggml_backend_dev_buffer_from_host_ptr(dev, base, file->size(), max_size);
            if (!buf) fail(MLLAMA_ERR_BACKEND, "cannot wrap the mapping of '%s' in a CPU buffer", file->path().c_str());
            m.buffers.push_back(buf);
            ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
                const tensor_source & src = loader.source(t);
                if (t->buffer || src.file != file.get()) continue;  // repacked, or in the other file
                if (ggml_backend_tensor_alloc(buf, t, base + file->data_offset(src.name)) != GGML_STATUS_SUCCESS) fail(MLLAMA_ERR_BACKEND, "cannot place tensor '%s'", ggml_get_name(t));
            }
        }
        return;
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(dev));
    if (!buf) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the weights on %s", ggml_backend_dev_name(dev));
    m.buffers.push_back(buf);
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    std::vector<uint8_t> staging;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        const tensor_source & src = loader.source(t);
        const uint64_t offset = src.file->data_offset(src.name);
        if (ggml_backend_buffer_is_host(buf)) {
            src.file->read(offset, t->data, ggml_nbytes(t));
        } else if (src.file->mapping()) {
            ggml_backend_tensor_set(t, src.file->mapping() + offset, 0, ggml_nbytes(t));
        } else {
            staging.resize(ggml_nbytes(t));
            src.file->read(offset, staging.data(), staging.size());
            ggml_backend_tensor_set(t, staging.data(), 0, staging.size());
        }
    }
}

// Ollama permuted the cross-attention q/k rows (RoPE-style, per head) but not q_norm/k_norm: give
// the norms the same permutation, so the normalized q.k products equal the reference's.
static void permute_cross_norms(mllama_model & m) {
    std::vector<ggml_tensor **> norms;
    for (text_layer_w & l : m.text.layers) {
        if (l.is_cross) norms.insert(norms.end(), {&l.cross.q_norm, &l.cross.k_norm});
    }
    if (norms.empty()) return;
    ggml_context * ctx = new_descriptor_context(norms.size());
    m.contexts.push_back(ctx);
    std::vector<std::pair<ggml_tensor *, std::vector<float>>> values;
    for (ggml_tensor ** norm : norms) {
        std::vector<float> v(static_cast<size_t>(ggml_nelements(*norm)));
        ggml_backend_tensor_get(*norm, v.data(), 0, v.size() * sizeof(float));
        ggml_tensor * t = ggml_dup_tensor(ctx, *norm);
        ggml_format_name(t, "%s (permuted)", ggml_get_name(*norm));
        values.emplace_back(t, rope_permute_head(v));
        *norm = t;
    }
    ggml_backend_dev_t dev = m.compute_device;
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(dev));
    if (!buf) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the permuted norms");
    m.buffers.push_back(buf);
    for (auto & [t, v] : values) ggml_backend_tensor_set(t, v.data(), 0, v.size() * sizeof(float));
}

void read_weight(const mllama_model & m, const ggml_tensor * t, uint8_t * dst) {
    auto it = m.repacked.find(ggml_get_name(t));
    if (it == m.repacked.end()) ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
    else std::memcpy(dst, it->second.file->mapping() + it->second.offset, ggml_nbytes(t));
}

static void validate_data(const mllama_model & m) {
    std::vector<uint8_t> host;
    for (const auto & [name, t] : m.tensors) {
        host.resize(ggml_nbytes(t));
        read_weight(m, t, host.data());
        if (!ggml_validate_row_data(t->type, host.data(), host.size())) {
            fail(MLLAMA_ERR_MODEL, "tensor '%s' holds invalid data (NaN, Inf or a bad block)", name.c_str());
        }
    }
}

static void fill_info(mllama_model & m) {
    mllama_model_info & info = m.info;
    info.format = m.conv.format;
    for (const auto & file : m.files) info.file_size += file->size();
    std::snprintf(info.conventions, sizeof(info.conventions), "%s", m.conv.describe().c_str());
    info.n_tensors = static_cast<int64_t>(m.tensors.size());
    for (const auto & [name, t] : m.tensors) {
        info.n_params += static_cast<uint64_t>(ggml_nelements(t));
        info.n_bytes_weights += ggml_nbytes(t);
    }
    info.use_mmap = m.params.use_mmap;
    info.n_threads = m.params.n_threads;
    std::snprintf(info.device, sizeof(info.device), "%s", ggml_backend_dev_name(m.compute_device));
    std::snprintf(info.name, sizeof(info.name), "%s", m.hp.name.c_str());
}

std::unique_ptr<mllama_model> load_model(const char * path, const char * projector_path, const mllama_model_params & params) {
    auto m = std::make_unique<mllama_model>();
    m->params = params;
    m->log = logger{params.log_callback, params.log_user_data, params.log_level};
    log_scope scope(&m->log);
    if (m->params.n_threads <= 0) m->params.n_threads = physical_core_count();

    m->files.push_back(std::make_unique<gguf_file>(path));
    if (projector_path && *projector_path) m->files.push_back(std::make_unique<gguf_file>(projector_path));
    std::vector<const gguf_file *> files;
    std::vector<const gguf_context *> metas;
    for (const auto & f : m->files) {
        files.push_back(f.get());
        metas.push_back(f->gguf());
    }
    m->conv = detect_conventions(files);
    m->hp = load_hparams(gguf_meta(metas));
    m->hp.text.rope_neox = !m->conv.rope_permuted;
    m->compute_device = select_device(params.device);
    const bool on_cpu = is_cpu(m->compute_device);
    m->params.use_mmap = params.use_mmap ? 1 : 0;
    if (m->params.use_mmap) {
        for (const auto & f : m->files) f->map();
    }

    const int64_t n_layer = m->hp.text.n_layer;
    const int64_t n_gpu = on_cpu ? 0 : (params.n_gpu_layers < 0 ? n_layer : std::min<int64_t>(params.n_gpu_layers, n_layer));
    m->info.n_gpu_layers = static_cast<int32_t>(n_gpu);

    size_t n_file_tensors = 0;
    for (const auto & f : m->files) n_file_tensors += static_cast<size_t>(f->n_tensors());
    placement where;
    where.cpu = new_descriptor_context(n_file_tensors);
    m->contexts.push_back(where.cpu);
    where.device = on_cpu ? where.cpu : new_descriptor_context(n_file_tensors);
    if (!on_cpu) m->contexts.push_back(where.device);
    where.first_device_layer = static_cast<int>(n_layer - n_gpu);

    tensor_loader loader(files, m->conv);
    m->text = load_text_weights(m->hp.text, loader, where);
    m->hp.text.n_vocab_embd = m->text.token_embd->ne[1];
    check_token_ids(m->hp, m->hp.text.n_vocab_embd);
    m->vision = load_vision_weights(m->hp.vision, loader, where.device);  // the vision tower stays on the device
    for (const std::string & name : loader.unused()) m->log.log(MLLAMA_LOG_WARN, "ignoring unknown tensor '%s'", name.c_str());

    allocate(*m, where.cpu, cpu_device(), m->params.use_mmap, loader);
    if (!on_cpu) allocate(*m, where.device, m->compute_device, m->params.use_mmap, loader);
    for (ggml_context * ctx : m->contexts) {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) m->tensors[ggml_get_name(t)] = t;
    }
    if (params.check_tensors) validate_data(*m);
    read_gates(m->text, m->vision, m->conv.gates_pretanh);
    fill_info(*m);
    if (m->conv.cross_qk_permuted) permute_cross_norms(*m);
    m->log.log(MLLAMA_LOG_INFO, "loaded '%s': %lld tensors, %.1f MiB on %s (%s)", path, (long long) m->info.n_tensors,
               m->info.n_bytes_weights / 1048576.0, m->info.device, m->conv.describe().c_str());
    return m;
}

}  // namespace mllama
