#include "runtime/context.h"

#include "common/error.h"
#include "common/text.h"
#include "model/model.h"
#include "runtime/backend.h"
#include "runtime/compute.h"
#include "runtime/encode_steps.h"
#include "runtime/rope.h"
#include "runtime/rpc.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <string>

// A worker lost mid-run leaves buffers on its device that ggml-rpc cannot free: destruction frees
// what it can and skips those (free_quietly). It can also leave ggml's allocators holding a buffer that a failed
// re-allocation already freed (freeing the scheduler then crashed): with a lost worker, the scheduler and an
// encode under way are not freed (their memory is lost, as the model is).
mllama_context::~mllama_context() {
    using mllama::free_quietly;
    if (model && model->lost_worker) {
        (void) encode_job.release();
        sched = nullptr;
    }
    encode_job.reset();  // its buffer before the backends
    if (sched) free_quietly([&] { ggml_backend_sched_free(sched); });
    for (ggml_backend_buffer * buf : state_buffers) free_quietly([&] { ggml_backend_buffer_free(buf); });
    for (ggml_context * ctx : state_ctxs) ggml_free(ctx);
    for (ggml_backend * b : backends) free_quietly([&] { ggml_backend_free(b); });
    if (backend_cpu) ggml_backend_free(backend_cpu);
}

namespace mllama {

mllama_context_params default_context_params() {
    mllama_context_params p{};
    p.n_ctx = 0;
    p.n_batch = k_default_n_batch;
    p.n_threads = 0;
    p.n_image_slots = k_default_n_image_slots;
    p.cross_kv_f32 = -1;
    p.kv_f32 = -1;
    p.dump_dir = nullptr;
    p.dump_filter = nullptr;
    p.cpu_kernels = nullptr;
    p.profile_path = nullptr;
    p.n_seq_max = 1;
    return p;
}

ggml_type cache_type(const mllama_model & model, int32_t requested) {
    if (requested == 1) return GGML_TYPE_F32;
    if (requested == 0) return GGML_TYPE_F16;
    // auto: full precision for full-precision models, else half
    return model.text.output->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

// The descriptor context of the persistent tensors that live on `dev` (one per device).
static ggml_context * state_context(mllama_context & c, std::vector<ggml_backend_dev_t> & devs,
                                    ggml_backend_dev_t dev) {
    for (size_t i = 0; i < devs.size(); ++i) {
        if (devs[i] == dev) return c.state_ctxs[i];
    }
    const mllama_model & m = *c.model;
    ggml_init_params params = {ggml_tensor_overhead() * (4 * m.hp.text.n_layer + 8), nullptr, /*no_alloc=*/true};
    ggml_context * ctx = ggml_init(params);
    if (!ctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create the context state");
    devs.push_back(dev);
    c.state_ctxs.push_back(ctx);
    return ctx;
}

static void allocate_state(mllama_context & c, const std::vector<ggml_backend_dev_t> & devs) {
    for (size_t i = 0; i < devs.size(); ++i) {
        ggml_backend_buffer * buf = ggml_backend_alloc_ctx_tensors_from_buft(c.state_ctxs[i],
                                                                              ggml_backend_dev_buffer_type(devs[i]));
        if (!buf) {
            fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the caches on %s (n_ctx %d x %d sequences, %d image slots)",
                 ggml_backend_dev_name(devs[i]), c.params.n_ctx, c.params.n_seq_max, c.params.n_image_slots);
        }
        c.state_buffers.push_back(buf);  // (freed with the context, also when clearing it fails)
        bound_rpc_calls(c.model->plan);  // the buffer's connection, before it is cleared
        ggml_backend_buffer_clear(buf, 0);
    }
}

cpu_kernel_set layer_kernels(const mllama_context & c, size_t il) {
    return kernels_for_compute(c.kernels, cpu_kernels_allowed_on(c.model->plan, c.model->plan.layers[il]));
}

// Whether our attention kernel may run in every cross-attention layer (cross) or every other decoder layer (graph/
// decoder.cpp picks it by the same layer_kernels).
static bool every_layer_runs_xattn(const mllama_context & c, bool cross) {
    const text_hparams & t = c.model->hp.text;
    for (int il = 0; il < t.n_layer; ++il) {
        if (t.is_cross(il) == cross && !layer_kernels(c, static_cast<size_t>(il)).may_run(cpu_kernel::xattn)) {
            return false;
        }
    }
    return true;
}

static void create_state(mllama_context & c) {
    const mllama_model & m = *c.model;
    const text_hparams & t = m.hp.text;
    context_state & st = c.state;
    st.n_vis = m.hp.vision.max_tiles * m.hp.vision.n_positions();
    const int64_t n_slots = c.params.n_image_slots;
    std::vector<ggml_backend_dev_t> devs;
    const ggml_type xtype = cache_type(m, c.params.cross_kv_f32), ktype = cache_type(m, c.params.kv_f32);
    st.cross_head_major = xtype == GGML_TYPE_F16 && caches_head_major() && every_layer_runs_xattn(c, true);
    st.self_head_major = ktype == GGML_TYPE_F16 && caches_head_major() && every_layer_runs_xattn(c, false);
    // [hd, Hkv, n], or [hd, n, Hkv] head_major
    auto cache = [&](ggml_type type, int64_t n, const char * fmt, int il, bool head_major = false) {
        ggml_context * ctx = state_context(c, devs, m.plan.layers[static_cast<size_t>(il)]);  // the layer's device
        const int64_t ne1 = head_major ? n : t.n_head_kv, ne2 = head_major ? t.n_head_kv : n;
        return ggml_format_name(ggml_new_tensor_3d(ctx, type, t.n_embd_head, ne1, ne2), fmt, il);
    };
    st.self_k.assign(t.n_layer, nullptr);
    st.self_v.assign(t.n_layer, nullptr);
    for (int il = 0; il < t.n_layer; ++il) {
        if (t.is_cross(il)) {
            if (n_slots == 0) continue;
            const int64_t n = st.n_vis * n_slots;
            // [hd, Hkv, n_slots * n_vis], or [hd, n_slots * n_vis, Hkv] head-major
            st.cross_k.push_back(cache(xtype, n, "cache.%d.cross_k", il, st.cross_head_major));
            st.cross_v.push_back(cache(xtype, n, "cache.%d.cross_v", il, st.cross_head_major));
        } else {
            const int64_t n_cells = static_cast<int64_t>(c.params.n_ctx) * c.params.n_seq_max;
            // [hd, Hkv, n_ctx * n_seq_max], or [hd, n_ctx * n_seq_max, Hkv] head-major
            st.self_k[il] = cache(ktype, n_cells, "cache.%d.k", il, st.self_head_major);
            st.self_v[il] = cache(ktype, n_cells, "cache.%d.v", il, st.self_head_major);
        }
    }
    std::vector<float> factors;
    if (t.rope_scaling == rope_scaling_type::llama3 && !m.text.rope_freqs) {
        factors = llama3_rope_factors(t);
        ggml_context * ctx = state_context(c, devs, cpu_device());
        st.rope_factors = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, static_cast<int64_t>(factors.size()));
    }
    try {
        allocate_state(c, devs);
    } catch (const rpc_fault & e) {
        m.lost_worker = true;  // its weights on that worker are gone too
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s failed while the context's caches were allocated: %s",
             join(lost_workers(m.plan.endpoints)).c_str(), e.what());
    }
    if (st.rope_factors) ggml_backend_tensor_set(st.rope_factors, factors.data(), 0, factors.size() * sizeof(float));
    c.slots.resize(static_cast<size_t>(n_slots));
    c.seq_length.assign(static_cast<size_t>(c.params.n_seq_max), 0);
}

// Resolves the values <= 0 to their defaults and checks the others against the model.
static void resolve_params(mllama_context & c, const mllama_model & model) {
    mllama_context_params & p = c.params;
    const int64_t n_ctx_train = model.hp.text.n_ctx_train;
    if (p.n_threads <= 0) p.n_threads = model.params.n_threads;
    if (p.n_threads > GGML_MAX_N_THREADS) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_threads %d exceeds ggml's %d", p.n_threads, GGML_MAX_N_THREADS);
    }
    for (int32_t precision : {p.cross_kv_f32, p.kv_f32}) {
        if (precision < -1 || precision > 1) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "cross_kv_f32 and kv_f32 take 1 (F32), 0 (F16) or -1 (auto), not %d",
                 precision);
        }
    }
    if (p.n_image_slots < 0 || p.n_image_slots > k_max_image_slots) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_image_slots must be in [0, %d]", k_max_image_slots);
    }
    if (p.n_ctx <= 0) p.n_ctx = static_cast<int32_t>(std::min<int64_t>(n_ctx_train, k_default_n_ctx_max));
    if (p.n_ctx > n_ctx_train) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_ctx %d exceeds the trained context %lld", p.n_ctx,
             (long long) n_ctx_train);
    }
    if (p.n_batch <= 0) p.n_batch = k_default_n_batch;
    if (p.n_seq_max <= 0) p.n_seq_max = 1;
    if (p.n_seq_max > k_max_seqs) fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_seq_max must be in [1, %d]", k_max_seqs);
    // a batch builds one self-attention per sequence and layer (about 16 nodes each)
    c.max_nodes = k_max_nodes + static_cast<size_t>(p.n_seq_max) * static_cast<size_t>(model.hp.text.n_layer) * 16;
    c.kernels = parse_cpu_kernels(p.cpu_kernels);  // each graph keeps them to what runs on the CPU
}

// The CPU backend, one per other device the model uses, and a scheduler over all of them.
static void start_backends(mllama_context & c, const mllama_model & model) {
    c.backend_cpu = ggml_backend_dev_init(cpu_device(), /*params=*/nullptr);
    if (!c.backend_cpu) fail(MLLAMA_ERR_BACKEND, "cannot start the CPU backend");
    set_backend_threads(c.backend_cpu, c.params.n_threads);
    for (ggml_backend_dev_t dev : devices_in_use(model.plan)) {
        ggml_backend_t backend = ggml_backend_dev_init(dev, /*params=*/nullptr);
        if (!backend) fail(MLLAMA_ERR_BACKEND, "cannot start device %s", ggml_backend_dev_name(dev));
        c.backends.push_back(backend);
    }
    std::vector<ggml_backend_t> all = c.backends;
    all.push_back(c.backend_cpu);
    c.sched = ggml_backend_sched_new(all.data(), /*bufts=*/nullptr, static_cast<int>(all.size()), c.max_nodes,
                                     /*parallel=*/false, /*op_offload=*/true);
    if (!c.sched) fail(MLLAMA_ERR_BACKEND, "cannot create the scheduler");
    const size_t graph_size = ggml_graph_overhead_custom(c.max_nodes, /*grads=*/false);
    c.graph_meta.resize(ggml_tensor_overhead() * c.max_nodes + graph_size);
}

// Tensor dumps (dump_dir) or, without them, per-op timings (profile_path); both copy their strings.
static void start_debugging(mllama_context & c, const mllama_context_params & params) {
    if (params.dump_dir && *params.dump_dir) {
        c.dumper = std::make_unique<tensor_dumper>(params.dump_dir, params.dump_filter ? params.dump_filter : "");
        ggml_backend_sched_set_eval_callback(c.sched, tensor_dumper::callback, c.dumper.get());
    } else if (params.profile_path && *params.profile_path) {
        c.profiler = std::make_unique<op_profiler>(params.profile_path);
        ggml_backend_sched_set_eval_callback(c.sched, op_profiler::callback, c.profiler.get());
    }
}

std::unique_ptr<mllama_context> new_context(const mllama_model & model, const mllama_context_params & params) {
    auto c = std::make_unique<mllama_context>();
    c->model = &model;
    c->params = params;
    c->log = model.log;
    log_scope scope(&c->log);
    resolve_params(*c, model);
    // the caller's strings die after init: what is kept was copied (kernels, dumper, profiler)
    c->params.dump_dir = c->params.dump_filter = c->params.cpu_kernels = c->params.profile_path = nullptr;
    start_backends(*c, model);
    create_state(*c);
    start_debugging(*c, params);
    return c;
}

mllama_context_memory context_memory(const mllama_context & c) {
    mllama_context_memory out{};
    for (const auto * list : {&c.state.self_k, &c.state.self_v})
        for (const ggml_tensor * t : *list) out.kv_cache += t ? ggml_nbytes(t) : 0;
    for (const auto * list : {&c.state.cross_k, &c.state.cross_v})
        for (const ggml_tensor * t : *list) out.image_slots += ggml_nbytes(t);
    for (ggml_backend_t b : c.backends) out.compute += ggml_backend_sched_get_buffer_size(c.sched, b);
    out.compute += ggml_backend_sched_get_buffer_size(c.sched, c.backend_cpu);
    return out;
}

}  // namespace mllama
