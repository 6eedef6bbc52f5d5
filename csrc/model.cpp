#include "model.h"

#include "backend.h"
#include "error.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf_meta.h"

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

static void check_identity(const gguf_file & file) {
    gguf_meta meta(file.gguf());
    const std::string arch = meta.get_str(kv::GENERAL_ARCHITECTURE, "");
    if (arch != k_arch_name) {
        fail(MLLAMA_ERR_FORMAT, "'%s' is not an mllama model (general.architecture = '%s')", file.path().c_str(), arch.c_str());
    }
    const std::string convention = meta.get_str(kv::WEIGHTS_CONVENTION, "");
    if (convention.empty()) {
        fail(MLLAMA_ERR_UNSUPPORTED, "'%s' was not written by the mllama converter (no '%s' key); Ollama-layout files are not supported yet",
             file.path().c_str(), key_name(kv::WEIGHTS_CONVENTION));
    }
    if (convention != k_weights_convention) {
        fail(MLLAMA_ERR_UNSUPPORTED, "'%s' uses weight convention '%s', this build reads '%s'", file.path().c_str(),
             convention.c_str(), k_weights_convention);
    }
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

// Allocate one context's tensors, pointing CPU tensors into the mapping when mmap is on, else
// allocating a buffer of the device and copying the data in.
static void allocate(mllama_model & m, ggml_context * ctx, ggml_backend_dev_t dev, bool use_mmap) {
    if (!ggml_get_first_tensor(ctx)) return;
    const gguf_file & file = *m.file;
    ggml_backend_buffer_t buf = nullptr;
    if (use_mmap && is_cpu(dev)) {
        size_t max_size = 0;
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) max_size = std::max(max_size, ggml_nbytes(t));
        buf = ggml_backend_dev_buffer_from_host_ptr(dev, const_cast<uint8_t *>(file.mapping()), file.size(), max_size);
        if (!buf) fail(MLLAMA_ERR_BACKEND, "cannot wrap the mapping of '%s' in a CPU buffer", file.path().c_str());
        m.buffers.push_back(buf);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
            void * addr = const_cast<uint8_t *>(file.mapping()) + file.data_offset(ggml_get_name(t));
            if (ggml_backend_tensor_alloc(buf, t, addr) != GGML_STATUS_SUCCESS) fail(MLLAMA_ERR_BACKEND, "cannot place tensor '%s'", ggml_get_name(t));
        }
    } else {
        buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(dev));
        if (!buf) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the weights on %s", ggml_backend_dev_name(dev));
        m.buffers.push_back(buf);
        std::vector<uint8_t> staging;
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
            const uint64_t offset = file.data_offset(ggml_get_name(t));
            if (ggml_backend_buffer_is_host(buf)) {
                file.read(offset, t->data, ggml_nbytes(t));
            } else if (file.mapping()) {
                ggml_backend_tensor_set(t, file.mapping() + offset, 0, ggml_nbytes(t));
            } else {
                staging.resize(ggml_nbytes(t));
                file.read(offset, staging.data(), staging.size());
                ggml_backend_tensor_set(t, staging.data(), 0, staging.size());
            }
        }
    }
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
}

static void validate_data(const mllama_model & m) {
    std::vector<uint8_t> host;
    for (const auto & [name, t] : m.tensors) {
        host.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, host.data(), 0, host.size());
        if (!ggml_validate_row_data(t->type, host.data(), host.size())) {
            fail(MLLAMA_ERR_MODEL, "tensor '%s' holds invalid data (NaN, Inf or a bad block)", name.c_str());
        }
    }
}

static void fill_info(mllama_model & m) {
    mllama_model_info & info = m.info;
    info.format = MLLAMA_FORMAT_MLLAMA;
    info.file_size = m.file->size();
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

std::unique_ptr<mllama_model> load_model(const char * path, const mllama_model_params & params) {
    auto m = std::make_unique<mllama_model>();
    m->params = params;
    m->log = logger{params.log_callback, params.log_user_data, params.log_level};
    log_scope scope(&m->log);
    if (m->params.n_threads <= 0) m->params.n_threads = physical_core_count();

    m->file = std::make_unique<gguf_file>(path);
    check_identity(*m->file);
    m->hp = load_hparams(gguf_meta(m->file->gguf()));
    m->compute_device = select_device(params.device);
    const bool on_cpu = is_cpu(m->compute_device);
    m->params.use_mmap = params.use_mmap ? 1 : 0;
    if (m->params.use_mmap) m->file->map();

    const int64_t n_layer = m->hp.text.n_layer;
    const int64_t n_gpu = on_cpu ? 0 : (params.n_gpu_layers < 0 ? n_layer : std::min<int64_t>(params.n_gpu_layers, n_layer));
    m->info.n_gpu_layers = static_cast<int32_t>(n_gpu);

    const size_t n_file_tensors = static_cast<size_t>(m->file->n_tensors());
    placement where;
    where.cpu = new_descriptor_context(n_file_tensors);
    m->contexts.push_back(where.cpu);
    where.device = on_cpu ? where.cpu : new_descriptor_context(n_file_tensors);
    if (!on_cpu) m->contexts.push_back(where.device);
    where.first_device_layer = static_cast<int>(n_layer - n_gpu);

    tensor_loader loader(*m->file, m->log);
    m->text = load_text_weights(m->hp.text, loader, where);
    m->hp.text.n_vocab_embd = m->text.token_embd->ne[1];
    check_token_ids(m->hp, m->hp.text.n_vocab_embd);
    m->vision = load_vision_weights(m->hp.vision, loader, where.device);  // the vision tower stays on the device
    for (const std::string & name : loader.unused()) m->log.log(MLLAMA_LOG_WARN, "ignoring unknown tensor '%s'", name.c_str());

    allocate(*m, where.cpu, cpu_device(), m->params.use_mmap);
    if (!on_cpu) allocate(*m, where.device, m->compute_device, m->params.use_mmap);
    for (ggml_context * ctx : m->contexts) {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) m->tensors[ggml_get_name(t)] = t;
    }
    if (params.check_tensors) validate_data(*m);
    read_gates(m->text, m->vision);
    fill_info(*m);
    m->log.log(MLLAMA_LOG_INFO, "loaded '%s': %lld tensors, %.1f MiB on %s", path, (long long) m->info.n_tensors,
               m->info.n_bytes_weights / 1048576.0, m->info.device);
    return m;
}

}  // namespace mllama
