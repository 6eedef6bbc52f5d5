// The input masks and positions of the graphs, written on the host: the vision attention mask, the
// cross-attention masks of a decode batch, and the causal mask and positions of decoding.
#pragma once

#include "ggml.h"
#include "runtime/batch.h"

#include <cstdint>
#include <vector>

namespace mllama {

// Writes the vision attention mask [n, n] F16 (n = n_padded * max_tiles) into dst: -inf where the
// query AND the key are padding (a tile beyond n_tiles, or a position beyond n_positions).
void set_vision_mask(ggml_tensor * dst, int64_t n_positions, int64_t n_padded, int64_t max_tiles, int32_t n_tiles);

// The cross-attention inputs of a decode batch.
struct cross_mask {
    std::vector<ggml_fp16_t> mask;  // [span.count * n_vis, n_tokens]: 0 for the (image, tile) keys a row may read
    std::vector<float> rows;        // [1, n_tokens]: 1 where the row attends to some image
};

// The keys of the slots in `span` (each n_vis keys, per_tile of them per tile) each row of the batch
// may read: the tiles its images have (slot_tiles: the tiles each slot holds, by slot index). A row
// that attends to no image reads the span's first key only (its output is zeroed by `rows`).
cross_mask cross_masks(const std::vector<batch_part> & parts, int32_t n_tokens, slot_span span,
                       const std::vector<int32_t> & slot_tiles, int64_t n_vis, int64_t per_tile);

// The self-attention mask of an attention group [g.n_kv, rows of the group]: the row of token i of a part reads its
// sequence's positions 0 .. n_past + i (a prefill part: the causal mask; a one-token part: its n_past + 1 cells).
std::vector<ggml_fp16_t> attention_mask(const std::vector<batch_part> & parts, const attention_group & g);

// [n_tokens]: each row's cache cell, seq * n_ctx + its position (the cache holds n_ctx cells per sequence).
std::vector<int64_t> cache_cells(const std::vector<batch_part> & parts, int64_t n_ctx);

// [n_tokens]: n_past + i.
std::vector<int32_t> positions(int32_t n_past, int32_t n_tokens);

}  // namespace mllama
