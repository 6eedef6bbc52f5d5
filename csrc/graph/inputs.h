// The input masks and positions of the graphs, written on the host: the vision attention mask, the
// cross-attention masks of a decode batch, and the causal mask and positions of decoding.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <vector>

namespace mllama {

// Writes the vision attention mask [n, n] F16 (n = n_padded * max_tiles) into dst: -inf where the
// query AND the key are padding (a tile beyond n_tiles, or a position beyond n_positions).
void set_vision_mask(ggml_tensor * dst, int64_t n_positions, int64_t n_padded, int64_t max_tiles, int32_t n_tiles);

// The cross-attention inputs of a decode batch.
struct cross_mask {
    std::vector<ggml_fp16_t> mask;  // [n_images * n_vis, n_tokens]: 0 for the (image, tile) keys a row may read
    std::vector<float> rows;        // [1, n_tokens]: 1 where the row attends to some image
};

// row_images: n_tokens x n_images bytes, 1 where the row attends to image m; image_tiles: the tiles
// each image has (of max_tiles); n_vis: keys per image; per_tile: keys per tile.
cross_mask cross_masks(const uint8_t * row_images, int32_t n_tokens, const std::vector<int32_t> & image_tiles,
                       int64_t n_vis, int64_t per_tile);

// [n_past + n_tokens, n_tokens]: row i reads positions 0 .. n_past + i.
std::vector<ggml_fp16_t> causal_mask(int32_t n_past, int32_t n_tokens);

// [n_tokens]: n_past + i.
std::vector<int32_t> positions(int32_t n_past, int32_t n_tokens);

}  // namespace mllama
