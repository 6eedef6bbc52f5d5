// The projector and, for every cross-attention layer, the K/V of an image's vision tokens, built
// into the image's graph after the vision encoder; stored in an image slot, read by the decoder.
#pragma once

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct mllama_model;

namespace mllama {

struct vision_options;

// Projector, then for every cross-attention layer K = k_norm(k_proj(x)) and V = v_proj(x), each
// [head_dim, n_head_kv, n_tiles * n_positions] (vision token index = tile * n_positions + p) for the tiles of
// vision_out [OD, n_positions, n_tiles] (image_tiles: the image's own; the decoder masks the others).
struct cross_kv {
    std::vector<ggml_tensor *> k, v;  // one per cross-attention layer, in layer order
};
cross_kv build_cross_kv(ggml_context * ctx, const mllama_model & model, ggml_tensor * vision_out,
                        const vision_options & opt);

// The same in two parts (an encode in steps): the projector, [n_embd, NT * P] F32; then the K/V of the
// cross-attention layers first..last-1 (counted among the cross-attention layers) from its output x.
ggml_tensor * project_vision(ggml_context * ctx, const mllama_model & model, ggml_tensor * vision_out,
                             const vision_options & opt);
cross_kv build_cross_kv_layers(ggml_context * ctx, const mllama_model & model, ggml_tensor * x,
                               const vision_options & opt, int first, int last);

// How many of the cross-attention K and V projections take our BF16 GEMM on their weights decoded to BF16
// (dequantize_bf16: quantized weights, where the vision tower's BF16 GEMM runs); the others take ggml's mul_mat.
int cross_kv_products_on_gemm(const mllama_model & model, const vision_options & opt);

// A view of `n_slots` consecutive image slots of a cross-attention cache tensor as [hd, Hkv, n_slots * n_vis]; the
// tensor is [hd, Hkv, n_slots * n_vis], or [hd, n_slots * n_vis, Hkv] where head_major (runtime/context.h).
ggml_tensor * slot_view(ggml_context * ctx, ggml_tensor * t, bool head_major, int64_t n_vis, int64_t first_slot,
                        int64_t n_slots);

// The first n_tiles tiles of the vision output [OD, n_positions, max_tiles] -> [OD, n_positions, n_tiles].
ggml_tensor * image_tiles(ggml_context * ctx, ggml_tensor * vision_out, int64_t n_tiles);

// A view of the first n_rows vision tokens of image slot `slot` of a cross-attention cache tensor: [hd, Hkv, n_rows]
// (head_major: as slot_view).
ggml_tensor * slot_rows(ggml_context * ctx, ggml_tensor * t, bool head_major, int64_t n_vis, int64_t slot,
                        int64_t n_rows);

}  // namespace mllama
