// The tiled ViT encoder graph: patch, tile and position embeddings, the local and global layers,
// and the vision output (final + intermediate layers). Builders describe; runtime/ feeds inputs
// and computes.
#pragma once

#include "kernels/dispatch.h"

#include <cstdint>
#include <functional>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct mllama_model;

namespace mllama {

struct vision_hparams;

struct linear_w;

struct vision_inputs {
    ggml_tensor * pixels = nullptr;  // [tile, tile, channels, max_tiles] F32
    ggml_tensor * ar_id = nullptr;   // [1] I32: aspect ratio id (row of the tile tables)
    ggml_tensor * mask = nullptr;    // [n_tok, n_tok] F16: -inf where query AND key are padding
};

// Which of our CPU kernels (kernels/dispatch.h) the graph uses in place of the generic ggml ops.
struct vision_options {
    bool bf16_attention = false;  // BF16 flash attention (half-precision vision weights, AVX-512 BF16 CPU)
    bool fast_gelu = false;       // vectorized exact GELU (AVX-512 CPU)
    bool bf16_gemm = false;       // BF16 GEMMs for the linear layers (BF16 vision weights, AVX-512 BF16 CPU)
    bool amx_gemm = false;        // those GEMMs on AMX tiles (an AMX CPU, or emulated: kernels/dispatch.h)
    bool amx_attention = false;   // the attention's two products on AMX tiles
};
// kernels: the ones the context may use (none when it computes on a GPU: kernels_for_compute).
vision_options vision_options_for(const mllama_model & model, const cpu_kernel_set & kernels);

// Our BF16 GEMM computes this linear layer (else ggml's mul_mat).
bool gemm_kernel_for(const linear_w & l, const vision_options & opt);

// The vision output for one image: [v_output_dim, n_positions, max_tiles], channels in the
// reference order: [final (n_embd) | intermediate interleaved (n_embd * n_intermediate, d * K + k)].
ggml_tensor * build_vision(ggml_context * ctx, const mllama_model & model, vision_inputs & in,
                           const vision_options & opt);

// The tower in stages, so that an encode can run a few layers at a time (runtime/encode_steps.cpp):
// stage 0 embeds the pixels; then two stages per layer, its attention and its MLP (each a residual add), for
// the local layers (the last followed by post_ln and the post-tile embedding), then the global ones.
int vision_n_stages(const vision_hparams & hp);

// keep(k, h): the input of the k-th intermediate layer (hp.intermediate_layers[k]), [D, N].
using intermediate_sink = std::function<void(size_t, ggml_tensor *)>;

// Stages [first, last) on the hidden state h ([D, N] F32, N = max_tiles * padded positions; unused when
// first is 0). Creates the inputs the stages read (pixels at stage 0; ar_id at stage 0 and the post-tile
// embedding; the mask unless in.mask is set already). Returns the hidden state after them, [D, N].
ggml_tensor * build_vision_stages(ggml_context * ctx, const mllama_model & model, vision_inputs & in,
                                  const vision_options & opt, int first, int last, ggml_tensor * h,
                                  const intermediate_sink & keep);

// The vision output from the last stage's hidden state and the intermediate layers' inputs.
ggml_tensor * build_vision_output(ggml_context * ctx, const vision_hparams & hp, ggml_tensor * h,
                                  const std::vector<ggml_tensor *> & inter);

// Padded tokens per tile (positions rounded up to a multiple of 8, as the reference pads).
int64_t padded_positions(int64_t n_positions);

}  // namespace mllama
