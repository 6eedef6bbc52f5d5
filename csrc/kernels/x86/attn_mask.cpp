// The vision attention's mask rows (kernels/x86/attn_mask.h): which rows of the mask are all zeros, and which
// 64-key blocks it hides from every other row; two ops, once per image for all of the tower's layers.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/attn_mask.h"

#include <algorithm>
#include <cstdint>

namespace mllama {
namespace {

const uint16_t * mask_row(const ggml_tensor * mask, int64_t i) {
    return reinterpret_cast<const uint16_t *>(static_cast<const char *>(mask->data) + i * mask->nb[1]);
}

// dst->src[0] = mask [N, N] F16 -> dst [N] I32: 1 where the row is all zeros (+0 or -0).
void find_zero_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * mask = dst->src[0];
    auto * out = static_cast<int32_t *>(dst->data);
    for (int64_t i = ith; i < mask->ne[1]; i += nth) {
        const uint16_t * row = mask_row(mask, i);
        out[i] = std::all_of(row, row + mask->ne[0], [](uint16_t h) { return (h & 0x7fffu) == 0; }) ? 1 : 0;
    }
}

// dst->src = {mask [N, N] F16, zero rows [N]} -> dst [N + Np / 64] I32: the zero rows, then per 64-key block 1
// where every row with a mask has -inf at each of the block's keys. A block the mask shows is found at the first
// such row (one cache line); a hidden one reads its column of the mask once (1-tile image of the 11B tower, 6432
// rows: 8 ms on Zen 4, MLLAMA_PROFILE).
void find_hidden_blocks(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * mask = dst->src[0];
    const auto * zero_rows = static_cast<const int32_t *>(dst->src[1]->data);
    const int64_t N = mask->ne[1], n_keys = mask->ne[0], n_blocks = dst->ne[0] - N;
    auto * out = static_cast<int32_t *>(dst->data);
    for (int64_t i = ith; i < N; i += nth) out[i] = zero_rows[i];
    for (int64_t b = ith; b < n_blocks; b += nth) {
        const int64_t k0 = b * attn::k_mask_block, k1 = std::min(k0 + attn::k_mask_block, n_keys);
        bool hidden = true;
        for (int64_t i = 0; i < N && hidden; ++i) {
            if (zero_rows[i]) continue;
            const uint16_t * row = mask_row(mask, i);
            hidden = std::all_of(row + std::min(k0, k1), row + k1, [](uint16_t h) { return h == k_f16_neg_inf; });
        }
        out[N + b] = hidden ? 1 : 0;
    }
}

}  // namespace

ggml_tensor * bf16_attention_mask_rows(ggml_context * ctx, ggml_tensor * mask) {
    const int64_t N = mask->ne[1], n_blocks = (mask->ne[0] + attn::k_mask_block - 1) / attn::k_mask_block;
    ggml_tensor * zero_rows = ggml_custom_4d(ctx, GGML_TYPE_I32, N, 1, 1, 1, &mask, /*n_args=*/1, find_zero_rows,
                                             GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // [N]
    ggml_tensor * args[] = {mask, zero_rows};
    return ggml_custom_4d(ctx, GGML_TYPE_I32, N + n_blocks, 1, 1, 1, args, /*n_args=*/2, find_hidden_blocks,
                          GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // [N + Np / 64]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
