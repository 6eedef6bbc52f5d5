// The text decoder graph: self-attention layers with a KV cache, gated cross-attention
// layers reading the image slots, final norm and the logits of the requested rows.
#pragma once

#include <cstdint>

struct ggml_cgraph;
struct ggml_context;
struct ggml_tensor;
struct mllama_context;

namespace mllama {

struct text_inputs {
    ggml_tensor * tokens = nullptr;   // [n_tokens] I32
    ggml_tensor * pos = nullptr;      // [n_tokens] I32: n_past + i
    ggml_tensor * kq_mask = nullptr;  // [n_past + n_tokens, n_tokens] F16: causal
    ggml_tensor * x_mask = nullptr;   // [n_images * n_vis, n_tokens] F16: allowed (image, tile) pairs, or nullptr
    ggml_tensor * x_rows = nullptr;   // [1, n_tokens] F32: 1 where the row attends to some image, or nullptr
    ggml_tensor * out_rows = nullptr; // [n_out] I32: rows whose logits are computed
};

struct text_shape {
    int64_t n_tokens, n_past, n_images, n_out;
};

// Returns the logits [n_vocab, n_out].
ggml_tensor * build_text(ggml_context * ctx, const mllama_context & c, const text_shape & shape, text_inputs & in,
                         ggml_cgraph * gf);

}  // namespace mllama
