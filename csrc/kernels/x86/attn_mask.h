// What the vision tower's attention mask lets the attention kernels skip (kernels/x86/attn_bf16.cpp, attn_amx.cpp,
// attn_avx2.cpp), found once per image for every layer by kernels/dispatch.h's bf16_attention_mask_rows
// (kernels/x86/attn_mask.cpp):
//
//   mask_rows [N + Np / 64] I32: [i] = 1 where mask row i is all zeros (+0 or -0); [N + b] = 1 where every
//   other row has -inf at every key of block b (keys 64 b .. 64 b + 63; keys past N are padding, -inf anyway)
//
// The vision mask (reference §3.6) puts -inf at padding x padding pairs only. A row of zeros needs no mask added;
// rows that all have a mask give every key of a hidden block the probability 0 (2^-inf, rounded to BF16), so their
// scores and P V need not be computed at all: the result is the same, block for block, as with them. For a 1-tile
// image that is its three padding tiles' keys against its padding rows, 56% of the products; for 2 tiles, 25%.
#pragma once

#include "ggml.h"

#include <algorithm>
#include <cstdint>

namespace mllama::attn {

constexpr int64_t k_mask_block = 64;  // keys per hidden-block flag (the kernels' key blocks are this or a multiple)

struct mask_view {
    const int32_t * zero_rows = nullptr;  // [N]
    const int32_t * hidden = nullptr;     // [Np / k_mask_block]
    int64_t N = 0;

    // Whether rows i0..i0+n-1 all have a mask / any has one (rows past N: row N - 1, as the kernels pad tiles).
    bool all_masked(int64_t i0, int64_t n) const {
        for (int64_t i = i0; i < i0 + n; ++i)
            if (zero_rows[std::min(i, N - 1)]) return false;
        return true;
    }
    bool any_masked(int64_t i0, int64_t n) const {
        for (int64_t i = i0; i < i0 + n; ++i)
            if (!zero_rows[std::min(i, N - 1)]) return true;
        return false;
    }
    // The first key block at or after jb (a multiple of k_mask_block) and before jb1 that rows which all have a
    // mask must see; jb1 if none.
    int64_t next_live(int64_t jb, int64_t jb1) const {
        while (jb < jb1 && hidden[jb / k_mask_block]) jb += k_mask_block;
        return std::min(jb, jb1);
    }
};

// mask_rows: the attention op's fifth source (bf16_attention_mask_rows of the [N, N] mask).
inline mask_view mask_view_of(const ggml_tensor * mask_rows, int64_t N) {
    const auto * rows = static_cast<const int32_t *>(mask_rows->data);
    return {rows, rows + N, N};
}

}  // namespace mllama::attn
