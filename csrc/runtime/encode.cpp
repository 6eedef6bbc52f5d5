// Image encoding: the vision encoder and the cross K/V graph of one image, stored in an image slot.
#include "common/error.h"
#include "graph/cross_kv.h"
#include "graph/inputs.h"
#include "graph/vision.h"
#include "model/model.h"
#include "runtime/compute.h"
#include "runtime/context.h"
#include "runtime/encode_steps.h"
#include "runtime/slot_state.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstring>
#include <utility>
#include <vector>

namespace mllama {

void check_image_args(const mllama_context & c, int32_t slot, const float * pixels, int64_t n_pixels,
                      int32_t aspect_ratio_id, int32_t n_tiles, const float * features, int64_t n_features) {
    const vision_hparams & hp = c.model->hp.vision;
    const int64_t want_pixels = hp.max_tiles * hp.n_channels * hp.image_size * hp.image_size;
    const int64_t want_features = hp.max_tiles * hp.n_positions() * hp.output_dim();
    if (slot < 0 || slot >= static_cast<int32_t>(c.slots.size())) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d out of range (%zu slots)", slot, c.slots.size());
    }
    if (!pixels) fail(MLLAMA_ERR_INVALID_ARGUMENT, "the pixels pointer is NULL");
    if (n_pixels != want_pixels) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "expected %lld pixel values, got %lld", (long long) want_pixels,
             (long long) n_pixels);
    }
    if (aspect_ratio_id < 1 || aspect_ratio_id > static_cast<int32_t>(hp.aspect_ratios.size())) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "aspect ratio id %d out of range", aspect_ratio_id);
    }
    const auto & [tiles_h, tiles_w] = hp.aspect_ratios[aspect_ratio_id - 1];
    if (n_tiles != tiles_h * tiles_w) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "aspect ratio id %d has %d tiles, got n_tiles %d", aspect_ratio_id,
             tiles_h * tiles_w, n_tiles);
    }
    if (features && n_features != want_features) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "feature buffer holds %lld values, %lld needed", (long long) n_features,
             (long long) want_features);
    }
    if (c.state.cross_k.empty()) fail(MLLAMA_ERR_UNSUPPORTED, "the model has no cross-attention layers");
}

void expand_slot_kv(ggml_context * ctx, ggml_cgraph * gf, const mllama_context & c, const cross_kv & kv,
                    size_t first_cross, int32_t slot) {
    for (size_t j = 0; j < kv.k.size(); ++j) {  // into the slot: persistent, read by the decoder
        const size_t i = first_cross + j;
        const int64_t n_rows = kv.k[j]->ne[2];
        const bool head_major = c.state.cross_head_major;
        ggml_tensor * k_slot = slot_rows(ctx, c.state.cross_k[i], head_major, c.state.n_vis, slot, n_rows);
        ggml_tensor * v_slot = slot_rows(ctx, c.state.cross_v[i], head_major, c.state.n_vis, slot, n_rows);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, kv.k[j], k_slot));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, kv.v[j], v_slot));
    }
}

void finish_slot(mllama_context & c, int32_t slot, int32_t aspect_ratio_id, int32_t n_tiles) {
    clear_missing_tiles(c, slot, n_tiles);
    image_slot & s = c.slots[slot];
    s.used = true;
    s.n_tiles = n_tiles;
    s.aspect_ratio_id = aspect_ratio_id;
}

void encode_image(mllama_context & c, int32_t slot, const float * pixels, int64_t n_pixels, int32_t aspect_ratio_id,
                  int32_t n_tiles, float * features, int64_t n_features) {
    check_image_args(c, slot, pixels, n_pixels, aspect_ratio_id, n_tiles, features, n_features);
    const mllama_model & m = *c.model;
    const vision_hparams & hp = m.hp.vision;
    drop_encode_job(c, slot);
    c.slots[slot].used = false;
    vision_inputs in;
    ggml_tensor * out = nullptr;
    const vision_options opt = vision_options_for(m, c.kernels);
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, c.max_nodes, /*grads=*/false);
        out = build_vision(ctx, m, in, opt);
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        // the projector and the K/V of the image's own tiles (the decoder masks the others; their rows zeroed after)
        const cross_kv kv = build_cross_kv(ctx, m, image_tiles(ctx, out, n_tiles), opt);
        expand_slot_kv(ctx, gf, c, kv, 0, slot);
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
    finish_slot(c, slot, aspect_ratio_id, n_tiles);
}

void read_cross_kv(const mllama_context & c, int32_t slot, int32_t cross_index, float * k, float * v, int64_t n) {
    if (slot < 0 || slot >= static_cast<int32_t>(c.slots.size()) || !c.slots[slot].used) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d holds no image", slot);
    }
    const context_state & st = c.state;
    if (cross_index < 0 || cross_index >= static_cast<int32_t>(st.cross_k.size())) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "cross layer index %d out of range", cross_index);
    }
    ggml_tensor * tk = st.cross_k[cross_index];
    ggml_tensor * tv = st.cross_v[cross_index];
    const int64_t per_slot = tk->ne[0] * c.model->hp.text.n_head_kv * st.n_vis;
    if (n != per_slot) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "buffers hold %lld values, %lld needed", (long long) n, (long long) per_slot);
    }
    for (auto [t, dst] : {std::pair{tk, k}, std::pair{tv, v}}) {
        if (!dst) continue;
        std::vector<uint8_t> raw(static_cast<size_t>(per_slot) * ggml_type_size(t->type));
        const ggml_tensor * cache = t;  // (a structured binding is not captured by a lambda before C++20)
        on_workers(c, [&] { read_slot_rows(c, cache, slot, 0, st.n_vis, raw.data()); });  // [hd, Hkv, n_vis]
        if (t->type == GGML_TYPE_F32) std::memcpy(dst, raw.data(), raw.size());
        else ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(raw.data()), dst, n);
    }
}

}  // namespace mllama
