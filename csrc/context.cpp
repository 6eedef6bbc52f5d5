#include "context.h"

#include "backend.h"
#include "error.h"
#include "model.h"
#include "vision.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstring>

mllama_context::~mllama_context() {
    if (sched) ggml_backend_sched_free(sched);
    if (slot_buffer) ggml_backend_buffer_free(slot_buffer);
    if (slot_ctx) ggml_free(slot_ctx);
    if (backend_device) ggml_backend_free(backend_device);
    if (backend_cpu) ggml_backend_free(backend_cpu);
}

namespace mllama {

static constexpr size_t k_max_nodes = 16384;

static void set_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto fn = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
    if (fn) fn(backend, n_threads);
}

static ggml_type cross_kv_type(const mllama_model & model, int32_t requested) {
    if (requested == 1) return GGML_TYPE_F32;
    if (requested == 0) return GGML_TYPE_F16;
    // auto: full precision for full-precision models, else half (the cache of an 11B image is 8 layers x 13 MB)
    return model.text.output->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

static void create_slots(mllama_context & c) {
    const mllama_model & m = *c.model;
    const auto & t = m.hp.text;
    const int64_t n_vis = m.hp.vision.max_tiles * m.hp.vision.n_positions();
    const size_t n_cross = t.cross_layers.size(), n_slots = static_cast<size_t>(c.params.n_image_slots);
    ggml_init_params params = {ggml_tensor_overhead() * (2 * n_cross * n_slots + 1), nullptr, true};
    c.slot_ctx = ggml_init(params);
    if (!c.slot_ctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create the image slot context");
    const ggml_type type = cross_kv_type(m, c.params.cross_kv_f32);
    c.slots.resize(n_slots);
    for (size_t s = 0; s < n_slots; ++s) {
        for (size_t i = 0; i < n_cross; ++i) {
            ggml_tensor * k = ggml_new_tensor_3d(c.slot_ctx, type, t.n_embd_head, t.n_head_kv, n_vis);
            ggml_tensor * v = ggml_new_tensor_3d(c.slot_ctx, type, t.n_embd_head, t.n_head_kv, n_vis);
            ggml_format_name(k, "slot.%zu.cross.%zu.k", s, i);
            ggml_format_name(v, "slot.%zu.cross.%zu.v", s, i);
            c.slots[s].k.push_back(k);
            c.slots[s].v.push_back(v);
        }
    }
    ggml_backend_t backend = c.backend_device ? c.backend_device : c.backend_cpu;
    c.slot_buffer = ggml_backend_alloc_ctx_tensors(c.slot_ctx, backend);
    if (!c.slot_buffer && n_slots * n_cross > 0) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate %zu image slots", n_slots);
}

std::unique_ptr<mllama_context> new_context(const mllama_model & model, const mllama_context_params & params) {
    auto c = std::make_unique<mllama_context>();
    c->model = &model;
    c->params = params;
    c->log = model.log;
    log_scope scope(&c->log);
    if (c->params.n_threads <= 0) c->params.n_threads = model.params.n_threads;
    if (c->params.n_image_slots < 0 || c->params.n_image_slots > 256) fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_image_slots must be in [0, 256]");

    c->backend_cpu = ggml_backend_dev_init(cpu_device(), nullptr);
    if (!c->backend_cpu) fail(MLLAMA_ERR_BACKEND, "cannot start the CPU backend");
    set_threads(c->backend_cpu, c->params.n_threads);
    std::vector<ggml_backend_t> backends;
    if (!is_cpu(model.compute_device)) {
        c->backend_device = ggml_backend_dev_init(model.compute_device, nullptr);
        if (!c->backend_device) fail(MLLAMA_ERR_BACKEND, "cannot start device %s", ggml_backend_dev_name(model.compute_device));
        backends.push_back(c->backend_device);
    }
    backends.push_back(c->backend_cpu);
    c->sched = ggml_backend_sched_new(backends.data(), nullptr, static_cast<int>(backends.size()), k_max_nodes, false, true);
    if (!c->sched) fail(MLLAMA_ERR_BACKEND, "cannot create the scheduler");
    c->graph_meta.resize(ggml_tensor_overhead() * k_max_nodes + ggml_graph_overhead_custom(k_max_nodes, false));
    create_slots(*c);
    if (params.dump_dir && *params.dump_dir) {
        c->dumper = std::make_unique<tensor_dumper>(params.dump_dir, params.dump_filter ? params.dump_filter : "");
        ggml_backend_sched_set_eval_callback(c->sched, tensor_dumper::callback, c->dumper.get());
    }
    return c;
}

void compute(mllama_context & c, const std::function<ggml_cgraph *(ggml_context *)> & build,
             const std::function<void()> & feed, const std::function<void()> & fetch) {
    log_scope scope(&c.log);
    ggml_init_params params = {c.graph_meta.size(), c.graph_meta.data(), true};
    ggml_context * gctx = ggml_init(params);
    if (!gctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create a graph context");
    struct guard {
        ggml_context * ctx;
        ~guard() { ggml_free(ctx); }
    } g{gctx};
    ggml_cgraph * gf = build(gctx);
    ggml_backend_sched_reset(c.sched);
    if (!ggml_backend_sched_alloc_graph(c.sched, gf)) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the compute graph");
    feed();
    if (ggml_backend_sched_graph_compute(c.sched, gf) != GGML_STATUS_SUCCESS) fail(MLLAMA_ERR_BACKEND, "graph computation failed");
    fetch();
}

// ref: _prepare_aspect_ratio_attention_mask (M:86-110): only padding x padding pairs are masked.
static std::vector<ggml_fp16_t> vision_mask(int64_t n_positions, int64_t n_padded, int64_t max_tiles, int32_t n_tiles) {
    const int64_t n = n_padded * max_tiles;
    std::vector<uint8_t> pad(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pad[i] = (i / n_padded >= n_tiles) || (i % n_padded >= n_positions);
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask(static_cast<size_t>(n * n));
    for (int64_t q = 0; q < n; ++q) {
        for (int64_t k = 0; k < n; ++k) mask[q * n + k] = pad[q] && pad[k] ? neg_inf : zero;
    }
    return mask;
}

void encode_image(mllama_context & c, int32_t slot, const float * pixels, int64_t n_pixels, int32_t aspect_ratio_id,
                  int32_t n_tiles, float * features, int64_t n_features) {
    const mllama_model & m = *c.model;
    const vision_hparams & hp = m.hp.vision;
    const int64_t want_pixels = hp.max_tiles * hp.n_channels * hp.image_size * hp.image_size;
    const int64_t want_features = hp.max_tiles * hp.n_positions() * hp.output_dim();
    if (slot < 0 || slot >= static_cast<int32_t>(c.slots.size())) fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d out of range (%zu slots)", slot, c.slots.size());
    if (!pixels || n_pixels != want_pixels) fail(MLLAMA_ERR_INVALID_ARGUMENT, "expected %lld pixel values, got %lld", (long long) want_pixels, (long long) n_pixels);
    if (aspect_ratio_id < 1 || aspect_ratio_id > static_cast<int32_t>(hp.aspect_ratios.size())) fail(MLLAMA_ERR_INVALID_ARGUMENT, "aspect ratio id %d out of range", aspect_ratio_id);
    const auto & [tiles_h, tiles_w] = hp.aspect_ratios[aspect_ratio_id - 1];
    if (n_tiles != tiles_h * tiles_w) fail(MLLAMA_ERR_INVALID_ARGUMENT, "aspect ratio id %d has %d tiles, got n_tiles %d", aspect_ratio_id, tiles_h * tiles_w, n_tiles);
    if (features && n_features != want_features) fail(MLLAMA_ERR_INVALID_ARGUMENT, "feature buffer holds %lld values, %lld needed", (long long) n_features, (long long) want_features);

    image_slot & s = c.slots[slot];
    s.used = false;
    vision_inputs in;
    ggml_tensor * out = nullptr;
    const std::vector<ggml_fp16_t> mask = vision_mask(hp.n_positions(), padded_positions(hp.n_positions()), hp.max_tiles, n_tiles);
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, k_max_nodes, false);
        out = build_vision(ctx, m, in);
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        const cross_kv kv = build_cross_kv(ctx, m, out);
        for (size_t i = 0; i < kv.k.size(); ++i) {  // into the slot: persistent, read by the decoder
            ggml_build_forward_expand(gf, ggml_cpy(ctx, kv.k[i], s.k[i]));
            ggml_build_forward_expand(gf, ggml_cpy(ctx, kv.v[i], s.v[i]));
        }
        return gf;
    };
    auto feed = [&] {
        ggml_backend_tensor_set(in.pixels, pixels, 0, ggml_nbytes(in.pixels));
        ggml_backend_tensor_set(in.ar_id, &aspect_ratio_id, 0, sizeof(int32_t));
        ggml_backend_tensor_set(in.mask, mask.data(), 0, ggml_nbytes(in.mask));
    };
    auto fetch = [&] {
        if (features) ggml_backend_tensor_get(out, features, 0, ggml_nbytes(out));
    };
    compute(c, build, feed, fetch);
    s.used = true;
    s.n_tiles = n_tiles;
    s.aspect_ratio_id = aspect_ratio_id;
}

void read_cross_kv(const mllama_context & c, int32_t slot, int32_t cross_index, float * k, float * v, int64_t n) {
    if (slot < 0 || slot >= static_cast<int32_t>(c.slots.size()) || !c.slots[slot].used) fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d holds no image", slot);
    const image_slot & s = c.slots[slot];
    if (cross_index < 0 || cross_index >= static_cast<int32_t>(s.k.size())) fail(MLLAMA_ERR_INVALID_ARGUMENT, "cross layer index %d out of range", cross_index);
    ggml_tensor * tk = s.k[cross_index];
    ggml_tensor * tv = s.v[cross_index];
    if (n != ggml_nelements(tk)) fail(MLLAMA_ERR_INVALID_ARGUMENT, "buffers hold %lld values, %lld needed", (long long) n, (long long) ggml_nelements(tk));
    for (auto [t, dst] : {std::pair{tk, k}, std::pair{tv, v}}) {
        if (!dst) continue;
        std::vector<uint8_t> raw(ggml_nbytes(t));
        ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
        if (t->type == GGML_TYPE_F32) std::memcpy(dst, raw.data(), raw.size());
        else ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(raw.data()), dst, n);
    }
}

}  // namespace mllama
