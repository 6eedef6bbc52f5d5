// The text decoder graph: self-attention layers with a KV cache, gated cross-attention
// layers reading the image slots, final norm and the logits of the requested rows.
#pragma once

#include "runtime/batch.h"

#include <cstdint>
#include <vector>

struct ggml_cgraph;
struct ggml_context;
struct ggml_tensor;
struct mllama_context;

namespace mllama {

struct text_inputs {
    ggml_tensor * tokens = nullptr;          // [n_tokens] I32
    ggml_tensor * pos = nullptr;             // [n_tokens] I32: each row's position in its sequence
    std::vector<ggml_tensor *> kq_masks;     // per group: [n_kv, its rows] F16 (attention_mask)
    ggml_tensor * kv_cells = nullptr;        // [n_tokens] I64: each row's cache cell (cache_cells)
    ggml_tensor * x_mask = nullptr;          // [n_slots * n_vis, n_tokens] F16: allowed (image, tile) keys, or nullptr
    ggml_tensor * x_rows = nullptr;          // [1, n_tokens] F32: 1 where the row attends to some image, or nullptr
    ggml_tensor * out_rows = nullptr;        // [n_out] I32: rows whose logits are computed
};

struct text_shape {
    int64_t n_tokens = 0;                    // rows of the batch
    const std::vector<batch_part> * parts;   // the sequences' rows, in batch order
    const std::vector<attention_group> * groups;  // their self-attention groups (attention_groups(*parts))
    slot_span slots;                         // the image slots the batch reads (count 0: no cross-attention)
    int64_t n_out = 0;
};

// Returns the logits [n_vocab, n_out].
ggml_tensor * build_text(ggml_context * ctx, const mllama_context & c, const text_shape & shape, text_inputs & in,
                         ggml_cgraph * gf);

}  // namespace mllama
