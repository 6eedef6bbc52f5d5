// The tiled ViT encoder graph (spec §3) and the projector + cross-attention K/V (spec §4, §5.4),
// built into one ggml graph per image. Builders describe; context.cpp feeds inputs and computes.
#pragma once

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct mllama_model;

namespace mllama {

struct vision_inputs {
    ggml_tensor * pixels = nullptr;  // [tile, tile, channels, max_tiles] F32
    ggml_tensor * ar_id = nullptr;   // [1] I32: aspect ratio id (row of the tile tables)
    ggml_tensor * mask = nullptr;    // [n_tok, n_tok] F16: -inf where query AND key are padding
};

// Which of our CPU kernels (cpu_kernels.h) the graph uses in place of the generic ggml ops.
struct vision_options {
    bool bf16_attention = false;  // BF16 flash attention (half-precision vision weights, AVX-512 BF16 CPU)
    bool fast_gelu = false;       // vectorized exact GELU (AVX-512 CPU)
    bool bf16_gemm = false;       // BF16 GEMMs for the linear layers (BF16 vision weights, AVX-512 BF16 CPU)
};
vision_options vision_options_for(const mllama_model & model, bool on_cpu);

// The vision output for one image: [v_output_dim, n_positions, max_tiles], channels in the
// reference order: [final (n_embd) | intermediate interleaved (n_embd * n_intermediate, d * K + k)].
ggml_tensor * build_vision(ggml_context * ctx, const mllama_model & model, vision_inputs & in, const vision_options & opt);

// Projector, then for every cross-attention layer K = k_norm(k_proj(x)) and V = v_proj(x), each
// [head_dim, n_head_kv, max_tiles * n_positions] (vision token index = tile * n_positions + p).
struct cross_kv {
    std::vector<ggml_tensor *> k, v;  // one per cross-attention layer, in layer order
};
cross_kv build_cross_kv(ggml_context * ctx, const mllama_model & model, ggml_tensor * vision_out, const vision_options & opt);

// Padded tokens per tile (positions rounded up to a multiple of 8, as the reference pads).
int64_t padded_positions(int64_t n_positions);

}  // namespace mllama
