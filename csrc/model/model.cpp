#include "model/model.h"

#include "common/error.h"
#include "common/text.h"
#include "gguf/gguf_meta.h"
#include "gguf/quant.h"
#include "model/devices.h"
#include "model/placement.h"
#include "model/report.h"
#include "runtime/backend.h"
#include "runtime/rpc.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iterator>

mllama_model::~mllama_model() {
    bool faulted = false;
    for (ggml_backend_buffer * buf : buffers) faulted |= mllama::free_quietly([&] { ggml_backend_buffer_free(buf); });
    for (ggml_context * ctx : contexts) ggml_free(ctx);
    // A worker that died while the model was idle: ggml keeps its broken connection (held by the buffers it could
    // not free), so a later load of that endpoint must be refused as lost, saying why, not fail on it obscurely.
    if (faulted) mllama::lost_workers(plan.endpoints);
}

namespace mllama {

static void check_token_ids(const hparams & hp, int64_t n_vocab_embd) {
    const token_ids & t = hp.tokens;
    const std::pair<const char *, int64_t> ids[] = {{"image", t.image}, {"bos", t.bos}, {"eos", t.eos},
                                                    {"eot", t.eot},     {"eom", t.eom}, {"pad", t.pad}};
    for (const auto & [what, id] : ids) {
        if (id >= n_vocab_embd) {
            fail(MLLAMA_ERR_MODEL, "%s token id %lld has no embedding row (%lld rows)", what, (long long) id,
                 (long long) n_vocab_embd);
        }
    }
    if (t.n_tokens > n_vocab_embd) {
        fail(MLLAMA_ERR_MODEL, "the tokenizer has %lld tokens but token_embd.weight only %lld rows",
             (long long) t.n_tokens, (long long) n_vocab_embd);
    }
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
    std::snprintf(info.device, sizeof(info.device), "%s", ggml_backend_dev_name(m.plan.vision));
    for (size_t il = 0; il + 1 < m.plan.layers.size(); ++il) info.n_gpu_layers += is_cpu(m.plan.layers[il]) ? 0 : 1;
    std::snprintf(info.name, sizeof(info.name), "%s", m.hp.name.c_str());
}

mllama_model_params default_model_params() {
    mllama_model_params p{};
    p.n_threads = 0;
    p.device = nullptr;
    p.n_gpu_layers = -1;
    p.use_mmap = 1;
    p.check_tensors = 0;
    p.log_level = MLLAMA_LOG_WARN;
    p.log_callback = nullptr;
    p.log_user_data = nullptr;
    p.repack = 1;
    p.rpc_servers = nullptr;
    p.devices = nullptr;
    p.tensor_split = nullptr;
    p.n_tensor_split = 0;
    p.rpc_timeout_ms = 0;
    p.rpc_io_timeout_s = 0;
    return p;
}

gguf_meta metadata(const mllama_model & m) {
    std::vector<const gguf_context *> metas;
    for (const auto & f : m.files) metas.push_back(f->gguf());
    return gguf_meta(std::move(metas));
}

// Opens (and maps) the files, detects their conventions, reads the hparams and picks the device.
static void open_files(mllama_model & m, const char * path, const char * projector_path) {
    m.files.push_back(std::make_unique<gguf_file>(path));
    if (projector_path && *projector_path) m.files.push_back(std::make_unique<gguf_file>(projector_path));
    std::vector<const gguf_file *> files;
    for (const auto & f : m.files) files.push_back(f.get());
    m.conv = detect_conventions(files);
    m.hp = load_hparams(metadata(m));
    m.hp.text.rope_neox = !m.conv.rope_permuted;
    try {
        m.plan = plan_devices(m.params, static_cast<int>(m.hp.text.n_layer));
    } catch (const rpc_fault & e) {  // a worker lost while its devices were asked for their memory
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s failed while the devices were planned: %s",
             join(lost_workers(split_list(m.params.rpc_servers))).c_str(), e.what());
    }
    if (m.params.use_mmap) {
        for (const auto & f : m.files) f->map();
    }
}

// Descriptor contexts: the CPU's, then one per other device in use (vision, text layers, output).
static placement make_placement(mllama_model & m, size_t n_tensors) {
    placement where;
    where.layers = m.plan.layers;
    where.vision = m.plan.vision;
    where.cpu = new_descriptor_context(n_tensors);
    m.contexts.push_back(where.cpu);
    for (ggml_backend_dev_t dev : devices_in_use(m.plan)) {
        where.others.emplace_back(dev, new_descriptor_context(n_tensors));
        m.contexts.push_back(where.others.back().second);
    }
    return where;
}

// Creates the descriptors of every component (checked against the hparams) and allocates them.
static void load_weights(mllama_model & m) {
    std::vector<const gguf_file *> files;
    size_t n_file_tensors = 0;
    for (const auto & f : m.files) {
        files.push_back(f.get());
        n_file_tensors += static_cast<size_t>(f->n_tensors());
    }
    const placement where = make_placement(m, n_file_tensors);
    tensor_loader loader(files, m.conv);
    m.text = load_text_weights(m.hp.text, loader, where);
    m.hp.text.n_vocab_embd = m.text.token_embd->ne[1];
    check_token_ids(m.hp, m.hp.text.n_vocab_embd);
    m.vision = load_vision_weights(m.hp.vision, loader, where.context_for(where.vision));
    for (const std::string & name : loader.unused()) {
        m.log.log(MLLAMA_LOG_WARN, "ignoring unknown tensor '%s'", name.c_str());
    }
    allocate(m, where.cpu, cpu_device(), m.params.use_mmap, loader);
    for (const auto & [dev, ctx] : where.others) allocate(m, ctx, dev, m.params.use_mmap, loader);
    for (ggml_context * ctx : m.contexts) {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
            m.tensors[ggml_get_name(t)] = t;
        }
    }
}

std::unique_ptr<mllama_model> load_model(const char * path, const char * projector_path,
                                         const mllama_model_params & params) {
    auto m = std::make_unique<mllama_model>();
    m->params = params;
    m->log = logger{params.log_callback, params.log_user_data, params.log_level};
    log_scope scope(&m->log);
    if (m->params.n_threads <= 0) m->params.n_threads = physical_core_count();
    if (m->params.n_threads > GGML_MAX_N_THREADS) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_threads %d exceeds ggml's %d", m->params.n_threads, GGML_MAX_N_THREADS);
    }
    m->params.use_mmap = params.use_mmap ? 1 : 0;

    open_files(*m, path, projector_path);
    // read by open_files only: the caller's strings are not kept
    m->params.device = m->params.rpc_servers = m->params.devices = nullptr;
    m->params.tensor_split = nullptr;
    try {  // (every step that sends weights to the devices or reads some back)
        load_weights(*m);
        if (params.check_tensors) validate_data(*m);
        read_gates(m->text, m->vision, m->conv.gates_pretanh);
        fill_info(*m);
        if (m->conv.cross_qk_permuted) permute_cross_norms(*m);
        m->n_fused = fuse_projections(*m);
    } catch (const rpc_fault & e) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s failed while the weights were loaded: %s",
             join(lost_workers(m->plan.endpoints)).c_str(), e.what());
    }
    report_placement(*m);
    bound_rpc_calls(m->plan);
    m->plan.rpc_anchors.clear();  // the weights' buffers hold the connections now
    m->log.log(MLLAMA_LOG_INFO, "loaded '%s': %lld tensors, %.1f MiB on %s (%s)", path, (long long) m->info.n_tensors,
               m->info.n_bytes_weights / 1048576.0, m->info.device, m->conv.describe().c_str());
    return m;
}

mllama_tensor_info tensor_info(const mllama_model & m, int64_t index) {
    auto it = m.tensors.begin();
    std::advance(it, index);
    const ggml_tensor * t = it->second;
    mllama_tensor_info info{};
    std::snprintf(info.name, sizeof(info.name), "%s", it->first.c_str());
    info.type = t->type;
    info.n_dims = ggml_n_dims(t);
    for (int i = 0; i < 4; ++i) info.ne[i] = t->ne[i];
    info.n_bytes = ggml_nbytes(t);
    std::snprintf(info.buffer, sizeof(info.buffer), "%s", t->buffer ? ggml_backend_buffer_name(t->buffer) : "");
    return info;
}

void read_weight_f32(const mllama_model & m, const char * name, float * dst, int64_t n_elements) {
    auto it = m.tensors.find(name);
    if (it == m.tensors.end()) fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no tensor '%s'", name);
    const ggml_tensor * t = it->second;
    if (n_elements != ggml_nelements(t)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "tensor '%s' has %lld elements, the buffer %lld", name,
             (long long) ggml_nelements(t), (long long) n_elements);
    }
    std::vector<uint8_t> raw(ggml_nbytes(t));
    read_weight(m, t, raw.data());
    dequantize(t->type, raw.data(), raw.size(), dst, n_elements);
}

}  // namespace mllama
