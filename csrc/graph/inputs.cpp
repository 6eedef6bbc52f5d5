#include "graph/inputs.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>

namespace mllama {

// ref: transformers 5.23.0 modeling_mllama.py _prepare_aspect_ratio_attention_mask: only padding x
// padding pairs are masked. Written straight into the input tensor when its buffer is host memory
// (the mask is large: a temporary copy would cost a page fault per 4 KiB on every image).
void set_vision_mask(ggml_tensor * dst, int64_t n_positions, int64_t n_padded, int64_t max_tiles, int32_t n_tiles) {
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

// ref: transformers 5.23.0 modeling_mllama.py _prepare_cross_attention_mask and processing_mllama.py
// get_cross_attention_token_mask (which rows see which image).
cross_mask cross_masks(const std::vector<batch_part> & parts, int32_t n_tokens, slot_span span,
                       const std::vector<int32_t> & slot_tiles, int64_t n_vis, int64_t per_tile) {
    const int64_t n_keys = n_vis * span.count;
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    cross_mask out;
    out.mask.assign(static_cast<size_t>(n_keys * n_tokens), neg_inf);
    out.rows.assign(static_cast<size_t>(n_tokens), 0.0f);
    for (const batch_part & p : parts) {
        const size_t n_images = p.slots.size();
        for (int32_t i = 0; i < p.n_tokens; ++i) {
            const int64_t r = p.first_row + i;
            ggml_fp16_t * row = out.mask.data() + static_cast<size_t>(r) * n_keys;
            for (size_t img = 0; img < n_images; ++img) {
                if (!p.row_images[static_cast<size_t>(i) * n_images + img]) continue;
                out.rows[r] = 1.0f;
                const int64_t first = (p.slots[img] - span.first) * n_vis;
                const int64_t n_allowed = slot_tiles[p.slots[img]] * per_tile;  // tiles beyond the image's stay masked
                std::fill(row + first, row + first + n_allowed, zero);
            }
            if (out.rows[r] == 0.0f && n_keys > 0) row[0] = zero;  // no image: one key, output zeroed
        }
    }
    return out;
}

std::vector<ggml_fp16_t> attention_mask(const std::vector<batch_part> & parts, const attention_group & g) {
    std::vector<ggml_fp16_t> mask;
    for (size_t k = g.first_part; k < g.first_part + g.n_parts; ++k) {
        const batch_part & p = parts[k];
        for (int32_t i = 0; i < p.n_tokens; ++i) {
            const size_t row = mask.size();
            mask.resize(row + static_cast<size_t>(g.n_kv), ggml_fp32_to_fp16(-INFINITY));
            std::fill_n(mask.begin() + static_cast<std::ptrdiff_t>(row), p.n_past + i + 1, ggml_fp32_to_fp16(0.0f));
        }
    }
    return mask;
}

std::vector<int64_t> cache_cells(const std::vector<batch_part> & parts, int64_t n_ctx) {
    std::vector<int64_t> cells;
    for (const batch_part & p : parts) {
        for (int32_t i = 0; i < p.n_tokens; ++i) cells.push_back(p.seq * n_ctx + p.n_past + i);
    }
    return cells;
}

std::vector<int32_t> positions(int32_t n_past, int32_t n_tokens) {
    std::vector<int32_t> pos(static_cast<size_t>(n_tokens));
    for (int32_t i = 0; i < n_tokens; ++i) pos[i] = n_past + i;
    return pos;
}

}  // namespace mllama
