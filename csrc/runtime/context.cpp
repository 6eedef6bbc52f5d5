#include "runtime/context.h"

#include "runtime/backend.h"
#include "common/error.h"
#include "model/model.h"
#include "graph/decoder.h"
#include "graph/vision.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <cstring>

mllama_context::~mllama_context() {
    if (sched) ggml_backend_sched_free(sched);
    if (state_buffer) ggml_backend_buffer_free(state_buffer);
    if (state_ctx) ggml_free(state_ctx);
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

static ggml_type cache_type(const mllama_model & model, int32_t requested) {
    if (requested == 1) return GGML_TYPE_F32;
    if (requested == 0) return GGML_TYPE_F16;
    // auto: full precision for full-precision models, else half (an 11B image is 8 layers x 13 MB)
    return model.text.output->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

// ref: transformers modeling_rope_utils._compute_llama3_parameters; ggml divides theta by the factor.
static std::vector<float> llama3_rope_factors(const text_hparams & t) {
    const int64_t half = t.n_embd_head / 2;
    std::vector<float> factors(static_cast<size_t>(half));
    const double low_wl = t.rope_orig_ctx / t.rope_low_freq_factor, high_wl = t.rope_orig_ctx / t.rope_high_freq_factor;
    for (int64_t i = 0; i < half; ++i) {
        const float inv = 1.0f / std::pow(t.rope_freq_base, static_cast<float>(2 * i) / static_cast<float>(t.n_embd_head));
        const double wl = 2.0 * M_PI / inv;
        float scaled = inv;
        if (wl > low_wl) {
            scaled = inv / t.rope_factor;
        } else if (wl >= high_wl) {
            const double smooth = (t.rope_orig_ctx / wl - t.rope_low_freq_factor) / (t.rope_high_freq_factor - t.rope_low_freq_factor);
            scaled = static_cast<float>((1.0 - smooth) * inv / t.rope_factor + smooth * inv);
        }
        factors[i] = inv / scaled;
    }
    return factors;
}

static void create_state(mllama_context & c) {
    const mllama_model & m = *c.model;
    const text_hparams & t = m.hp.text;
    context_state & st = c.state;
    st.n_vis = m.hp.vision.max_tiles * m.hp.vision.n_positions();
    const int64_t n_slots = c.params.n_image_slots;
    ggml_init_params params = {ggml_tensor_overhead() * (4 * t.n_layer + 8), nullptr, true};
    c.state_ctx = ggml_init(params);
    if (!c.state_ctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create the context state");
    const ggml_type xtype = cache_type(m, c.params.cross_kv_f32), ktype = cache_type(m, c.params.kv_f32);
    st.self_k.assign(t.n_layer, nullptr);
    st.self_v.assign(t.n_layer, nullptr);
    for (int il = 0; il < t.n_layer; ++il) {
        if (t.is_cross(il)) {
            if (n_slots == 0) continue;
            st.cross_k.push_back(ggml_format_name(ggml_new_tensor_3d(c.state_ctx, xtype, t.n_embd_head, t.n_head_kv, st.n_vis * n_slots), "cache.%d.cross_k", il));
            st.cross_v.push_back(ggml_format_name(ggml_new_tensor_3d(c.state_ctx, xtype, t.n_embd_head, t.n_head_kv, st.n_vis * n_slots), "cache.%d.cross_v", il));
        } else {
            st.self_k[il] = ggml_format_name(ggml_new_tensor_3d(c.state_ctx, ktype, t.n_embd_head, t.n_head_kv, c.params.n_ctx), "cache.%d.k", il);
            st.self_v[il] = ggml_format_name(ggml_new_tensor_3d(c.state_ctx, ktype, t.n_embd_head, t.n_head_kv, c.params.n_ctx), "cache.%d.v", il);
        }
    }
    std::vector<float> factors;
    if (t.rope_scaling == rope_scaling_type::llama3 && !m.text.rope_freqs) {
        factors = llama3_rope_factors(t);
        st.rope_factors = ggml_new_tensor_1d(c.state_ctx, GGML_TYPE_F32, static_cast<int64_t>(factors.size()));
    }
    ggml_backend_t backend = c.backend_device ? c.backend_device : c.backend_cpu;
    c.state_buffer = ggml_backend_alloc_ctx_tensors(c.state_ctx, backend);
    if (!c.state_buffer) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the caches (n_ctx %d, %lld image slots)", c.params.n_ctx, (long long) n_slots);
    ggml_backend_buffer_clear(c.state_buffer, 0);
    if (st.rope_factors) ggml_backend_tensor_set(st.rope_factors, factors.data(), 0, factors.size() * sizeof(float));
    c.slots.resize(static_cast<size_t>(n_slots));
}

std::unique_ptr<mllama_context> new_context(const mllama_model & model, const mllama_context_params & params) {
    auto c = std::make_unique<mllama_context>();
    c->model = &model;
    c->params = params;
    c->log = model.log;
    log_scope scope(&c->log);
    if (c->params.n_threads <= 0) c->params.n_threads = model.params.n_threads;
    if (c->params.n_image_slots < 0 || c->params.n_image_slots > 256) fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_image_slots must be in [0, 256]");
    if (c->params.n_ctx <= 0) c->params.n_ctx = static_cast<int32_t>(std::min<int64_t>(model.hp.text.n_ctx_train, 4096));
    if (c->params.n_ctx > model.hp.text.n_ctx_train) fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_ctx %d exceeds the trained context %lld", c->params.n_ctx, (long long) model.hp.text.n_ctx_train);
    if (c->params.n_batch <= 0) c->params.n_batch = 512;

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
    create_state(*c);
    if (params.dump_dir && *params.dump_dir) {
        c->dumper = std::make_unique<tensor_dumper>(params.dump_dir, params.dump_filter ? params.dump_filter : "");
        ggml_backend_sched_set_eval_callback(c->sched, tensor_dumper::callback, c->dumper.get());
    } else if (const char * profile = std::getenv("MLLAMA_PROFILE"); profile && *profile) {
        c->profiler = std::make_unique<op_profiler>(profile);
        ggml_backend_sched_set_eval_callback(c->sched, op_profiler::callback, c->profiler.get());
    }
    return c;
}

// Maps in, before a graph's first run, the pages of the file-mapped weights it reads whole (a warm
// page cache otherwise costs the 11B vision tower ~2 s of page faults inside the first image), split
// across the threads; weights already done are skipped. Only on first use, so that loading (the
// converter's check, text-only work) does not pull in every page of the file; tables read by rows
// (token embeddings, position embeddings per aspect ratio) keep faulting in only the rows used.
static void populate_weights(mllama_context & c, ggml_cgraph * gf) {
    std::vector<std::pair<const uint8_t *, size_t>> ranges;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        for (const ggml_tensor * src : node->src) {
            if (!src || !src->buffer || ggml_backend_buffer_get_usage(src->buffer) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) continue;
            if (node->op == GGML_OP_GET_ROWS && src == node->src[0]) continue;
            if (!ggml_backend_buffer_is_host(src->buffer) || !c.populated.insert(src).second) continue;
            ranges.emplace_back(static_cast<const uint8_t *>(src->data), ggml_nbytes(src));
        }
    }
    if (!ranges.empty()) populate_pages(std::move(ranges), c.params.n_threads);
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
    advise_huge_pages(gf);
    populate_weights(c, gf);
    feed();
    if (ggml_backend_sched_graph_compute(c.sched, gf) != GGML_STATUS_SUCCESS) fail(MLLAMA_ERR_BACKEND, "graph computation failed");
    fetch();
}

// ref: _prepare_aspect_ratio_attention_mask (M:86-110): only padding x padding pairs are masked.
// Written straight into the input tensor when its buffer is host memory (82 MB for the 11B: a
// temporary copy would cost a page fault per 4 KiB on every image).
static void set_vision_mask(ggml_tensor * dst, int64_t n_positions, int64_t n_padded, int64_t max_tiles, int32_t n_tiles) {
    const int64_t n = n_padded * max_tiles;
    std::vector<uint8_t> pad(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pad[i] = (i / n_padded >= n_tiles) || (i % n_padded >= n_positions);
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    const bool host = ggml_backend_buffer_is_host(dst->buffer);
    std::vector<ggml_fp16_t> copy(host ? 0 : static_cast<size_t>(n * n));
    auto * mask = host ? static_cast<ggml_fp16_t *>(dst->data) : copy.data();
    for (int64_t q = 0; q < n; ++q) {
        for (int64_t k = 0; k < n; ++k) mask[q * n + k] = pad[q] && pad[k] ? neg_inf : zero;
    }
    if (!host) ggml_backend_tensor_set(dst, copy.data(), 0, ggml_nbytes(dst));
}

mllama_context_memory context_memory(const mllama_context & c) {
    mllama_context_memory out{};
    for (const auto * list : {&c.state.self_k, &c.state.self_v})
        for (const ggml_tensor * t : *list) out.kv_cache += t ? ggml_nbytes(t) : 0;
    for (const auto * list : {&c.state.cross_k, &c.state.cross_v})
        for (const ggml_tensor * t : *list) out.image_slots += ggml_nbytes(t);
    for (ggml_backend_t b : {c.backend_device, c.backend_cpu})
        if (b) out.compute += ggml_backend_sched_get_buffer_size(c.sched, b);
    return out;
}

ggml_tensor * slot_view(ggml_context * ctx, ggml_tensor * t, int64_t n_vis, int64_t first_slot, int64_t n_slots) {
    return ggml_view_3d(ctx, t, t->ne[0], t->ne[1], n_vis * n_slots, t->nb[1], t->nb[2], static_cast<size_t>(first_slot * n_vis) * t->nb[2]);
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
    if (c.state.cross_k.empty()) fail(MLLAMA_ERR_UNSUPPORTED, "the model has no cross-attention layers");
    vision_inputs in;
    ggml_tensor * out = nullptr;
    const vision_options opt = vision_options_for(m, c.backend_device == nullptr);
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, k_max_nodes, false);
        out = build_vision(ctx, m, in, opt);
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        const cross_kv kv = build_cross_kv(ctx, m, out, opt);
        for (size_t i = 0; i < kv.k.size(); ++i) {  // into the slot: persistent, read by the decoder
            ggml_build_forward_expand(gf, ggml_cpy(ctx, kv.k[i], slot_view(ctx, c.state.cross_k[i], c.state.n_vis, slot, 1)));
            ggml_build_forward_expand(gf, ggml_cpy(ctx, kv.v[i], slot_view(ctx, c.state.cross_v[i], c.state.n_vis, slot, 1)));
        }
        return gf;
    };
    auto feed = [&] {
        ggml_backend_tensor_set(in.pixels, pixels, 0, ggml_nbytes(in.pixels));
        ggml_backend_tensor_set(in.ar_id, &aspect_ratio_id, 0, sizeof(int32_t));
        set_vision_mask(in.mask, hp.n_positions(), padded_positions(hp.n_positions()), hp.max_tiles, n_tiles);
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
    const context_state & st = c.state;
    if (cross_index < 0 || cross_index >= static_cast<int32_t>(st.cross_k.size())) fail(MLLAMA_ERR_INVALID_ARGUMENT, "cross layer index %d out of range", cross_index);
    ggml_tensor * tk = st.cross_k[cross_index];
    ggml_tensor * tv = st.cross_v[cross_index];
    const int64_t per_slot = tk->ne[0] * tk->ne[1] * st.n_vis;
    if (n != per_slot) fail(MLLAMA_ERR_INVALID_ARGUMENT, "buffers hold %lld values, %lld needed", (long long) n, (long long) per_slot);
    for (auto [t, dst] : {std::pair{tk, k}, std::pair{tv, v}}) {
        if (!dst) continue;
        const size_t bytes = static_cast<size_t>(per_slot) * ggml_type_size(t->type);
        std::vector<uint8_t> raw(bytes);
        ggml_backend_tensor_get(t, raw.data(), static_cast<size_t>(slot) * bytes, bytes);
        if (t->type == GGML_TYPE_F32) std::memcpy(dst, raw.data(), raw.size());
        else ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(raw.data()), dst, n);
    }
}

}  // namespace mllama

namespace mllama {

// ref: transformers _prepare_cross_attention_mask (M:46-71) + processing_mllama masks (spec §5.5).
static void cross_masks(const mllama_context & c, int32_t n_tokens, int32_t n_images, const uint8_t * row_images,
                        std::vector<ggml_fp16_t> & x_mask, std::vector<float> & x_rows) {
    const int64_t n_vis = c.state.n_vis, n_keys = n_vis * n_images, per_tile = c.model->hp.vision.n_positions();
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    x_mask.assign(static_cast<size_t>(n_keys * n_tokens), neg_inf);
    x_rows.assign(static_cast<size_t>(n_tokens), 0.0f);
    for (int32_t i = 0; i < n_tokens; ++i) {
        ggml_fp16_t * row = x_mask.data() + static_cast<size_t>(i) * n_keys;
        for (int32_t img = 0; img < n_images; ++img) {
            if (!row_images[static_cast<size_t>(i) * n_images + img]) continue;
            x_rows[i] = 1.0f;
            const int64_t n_allowed = c.slots[img].n_tiles * per_tile;  // tiles beyond the image's count stay masked
            std::fill(row + img * n_vis, row + img * n_vis + n_allowed, zero);
        }
        if (x_rows[i] == 0.0f) std::fill(row, row + n_keys, zero);  // no image: attend anywhere, output zeroed
    }
}

void decode(mllama_context & c, const int32_t * tokens, int32_t n_tokens, int32_t n_past, int32_t n_images,
            const uint8_t * row_images, const int32_t * out_rows, int32_t n_out, float * logits) {
    const text_hparams & hp = c.model->hp.text;
    if (!tokens || n_tokens <= 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "decode needs at least one token");
    if (n_tokens > c.params.n_batch) fail(MLLAMA_ERR_INVALID_ARGUMENT, "%d tokens exceed n_batch %d", n_tokens, c.params.n_batch);
    if (n_past < 0 || static_cast<int64_t>(n_past) + n_tokens > c.params.n_ctx) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "context overflow: %d cached + %d new tokens exceed n_ctx %d", n_past, n_tokens, c.params.n_ctx);
    }
    if (n_images < 0 || n_images > static_cast<int32_t>(c.slots.size())) fail(MLLAMA_ERR_INVALID_ARGUMENT, "%d images exceed the %zu image slots", n_images, c.slots.size());
    if (n_images > 0 && !row_images) fail(MLLAMA_ERR_INVALID_ARGUMENT, "decode with images needs the row/image table");
    for (int32_t img = 0; img < n_images; ++img) {
        if (!c.slots[img].used) fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d holds no image", img);
    }
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (tokens[i] < 0 || tokens[i] >= hp.n_vocab_embd) fail(MLLAMA_ERR_INVALID_ARGUMENT, "token id %d out of range [0, %lld)", tokens[i], (long long) hp.n_vocab_embd);
    }
    if (n_out < 0 || (n_out > 0 && (!out_rows || !logits))) fail(MLLAMA_ERR_INVALID_ARGUMENT, "invalid output rows");
    for (int32_t i = 0; i < n_out; ++i) {
        if (out_rows[i] < 0 || out_rows[i] >= n_tokens) fail(MLLAMA_ERR_INVALID_ARGUMENT, "output row %d out of range", out_rows[i]);
    }
    const int32_t n_kv = n_past + n_tokens;
    std::vector<ggml_fp16_t> kq_mask(static_cast<size_t>(n_kv) * n_tokens, ggml_fp32_to_fp16(-INFINITY));
    for (int32_t i = 0; i < n_tokens; ++i) std::fill_n(kq_mask.begin() + static_cast<size_t>(i) * n_kv, n_past + i + 1, ggml_fp32_to_fp16(0.0f));
    std::vector<int32_t> pos(static_cast<size_t>(n_tokens));
    for (int32_t i = 0; i < n_tokens; ++i) pos[i] = n_past + i;
    std::vector<ggml_fp16_t> x_mask;
    std::vector<float> x_rows;
    if (n_images > 0) cross_masks(c, n_tokens, n_images, row_images, x_mask, x_rows);
    std::vector<int32_t> rows(out_rows, out_rows + n_out);
    if (rows.empty()) rows.push_back(n_tokens - 1);  // the graph needs an output; nothing is copied back

    text_inputs in;
    ggml_tensor * out = nullptr;
    const text_shape shape{n_tokens, n_past, n_images, static_cast<int64_t>(rows.size())};
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, k_max_nodes, false);
        out = build_text(ctx, c, shape, in, gf);
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        return gf;
    };
    auto feed = [&] {
        ggml_backend_tensor_set(in.tokens, tokens, 0, ggml_nbytes(in.tokens));
        ggml_backend_tensor_set(in.pos, pos.data(), 0, ggml_nbytes(in.pos));
        ggml_backend_tensor_set(in.kq_mask, kq_mask.data(), 0, ggml_nbytes(in.kq_mask));
        ggml_backend_tensor_set(in.out_rows, rows.data(), 0, ggml_nbytes(in.out_rows));
        if (in.x_mask) {
            ggml_backend_tensor_set(in.x_mask, x_mask.data(), 0, ggml_nbytes(in.x_mask));
            ggml_backend_tensor_set(in.x_rows, x_rows.data(), 0, ggml_nbytes(in.x_rows));
        }
    };
    auto fetch = [&] {
        if (n_out > 0) ggml_backend_tensor_get(out, logits, 0, ggml_nbytes(out));
    };
    compute(c, build, feed, fetch);
    c.n_decoded += n_tokens;
}

}  // namespace mllama
