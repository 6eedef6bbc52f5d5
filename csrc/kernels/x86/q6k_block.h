// What the Q6_K kernel's forms share (kernels/dispatch.h's q6k_matmul; kernels/x86/qmm_q6k.cpp: AVX-512
// VNNI, qmm_q6k_avx2.cpp: AVX2): ggml's block layout, the Q8_K rule's choice of maximum, the split of
// output channels across threads and the two custom ops of the graph.
#pragma once

#include "kernels/dispatch.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace mllama::q6k {

constexpr int64_t k_block = 256;  // weights per Q6_K block (ggml's QK_K), activations per 8-bit block
constexpr int64_t k_prefetch_blocks = 10;  // the forms prefetch the block this far ahead (~2 KiB) into L1

// ggml's block_q6_K (ggml-common.h), as it is in memory.
struct q6k_block {
    uint8_t ql[k_block / 2];      // low 4 bits: weight 128h + l + 32j in byte 64h + l + 32(j & 1), nibble j >> 1
    uint8_t qh[k_block / 4];      // high 2 bits: the same weight in byte 32h + l, bits 2j..2j+1
    int8_t scales[k_block / 16];  // one per 16 consecutive weights
    uint16_t d;                   // fp16 block scale
};
static_assert(sizeof(q6k_block) == 210, "Q6_K block layout");

// The first of x[0..256) whose magnitude is `largest`: ggml's Q8_K scale is -127 over it, sign included.
inline float first_of_magnitude(const float * x, float largest) {
    for (int64_t i = 0; i < k_block; ++i) {
        if (std::fabs(x[i]) == largest) return x[i];
    }
    return largest;
}

// dst->src[0] = x [K, N] F32 (K % 256 == 0) -> dst: each row's K / 256 activation blocks, written by
// quantize; (row, block) pairs split across threads. The body of the quantizing ops of the quantized
// products' forms (one per block layout).
template <class Q8, void (*quantize)(const float * x, Q8 & out)>
void quantize_rows(ggml_tensor * dst, int ith, int nth) {
    const ggml_tensor * x = dst->src[0];
    const int64_t n_blocks = x->ne[0] / k_block, total = n_blocks * x->ne[1];
    const int64_t per = (total + nth - 1) / nth, w0 = std::min(total, per * ith), w1 = std::min(total, w0 + per);
    for (int64_t w = w0; w < w1; ++w) {
        const int64_t row = w / n_blocks, b = w % n_blocks;
        const auto * xr = reinterpret_cast<const float *>(static_cast<const char *>(x->data) + row * x->nb[1]);
        auto * out = reinterpret_cast<Q8 *>(static_cast<char *>(dst->data) + row * dst->nb[1]);
        quantize(xr + b * k_block, out[b]);
    }
}

// One output channel (a row of n_blocks Q6_K blocks) against R rows of activation blocks (stride: blocks
// between rows), one function per R = 1..k_qmm_max_rows: sums[r] = the channel's dot product with row r.
template <class Q8>
using channel_fn = void (*)(const q6k_block * w, int64_t n_blocks, const Q8 * x, int64_t stride, float * sums);

// dst [M, N] = W x^T; dst->src = {w [K, M] Q6_K, xq: N rows of Q8 blocks}; output channels split across
// threads in contiguous ranges (each thread streams its part of W once).
template <class Q8>
void for_each_channel(ggml_tensor * dst, int ith, int nth, const channel_fn<Q8> (&channels)[k_qmm_max_rows]) {
    const ggml_tensor * w = dst->src[0], * xq = dst->src[1];
    const int64_t n_blocks = w->ne[0] / k_block, M = w->ne[1], N = xq->ne[1];
    const int64_t per = (M + nth - 1) / nth, m0 = std::min(M, per * ith), m1 = std::min(M, m0 + per);
    const auto * x = static_cast<const Q8 *>(xq->data);
    const int64_t stride = static_cast<int64_t>(xq->nb[1] / sizeof(Q8));
    const channel_fn<Q8> channel = channels[N - 1];
    float sums[k_qmm_max_rows];
    for (int64_t m = m0; m < m1; ++m) {
        channel(reinterpret_cast<const q6k_block *>(static_cast<const char *>(w->data) + m * w->nb[1]), n_blocks, x, stride,
                sums);
        for (int64_t r = 0; r < N; ++r) {
            reinterpret_cast<float *>(static_cast<char *>(dst->data) + r * dst->nb[1])[m] = sums[r];  // dst [M, N]
        }
    }
}

// x [K, N] quantized by `quantize` into K / 256 blocks of q8_bytes per row, then `product` -> [M, N].
inline ggml_tensor * matmul_graph(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, size_t q8_bytes,
                                  ggml_custom_op_t quantize, ggml_custom_op_t product) {
    const int64_t K = w->ne[0], M = w->ne[1], N = x->ne[1];
    const int64_t row_bytes = K / k_block * static_cast<int64_t>(q8_bytes);
    ggml_tensor * xq = ggml_custom_4d(ctx, GGML_TYPE_I8, row_bytes, N, 1, 1, &x, /*n_args=*/1, quantize, GGML_N_TASKS_MAX,
                                      /*userdata=*/nullptr);  // [row_bytes, N]
    ggml_tensor * args[] = {w, xq};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, M, N, 1, 1, args, /*n_args=*/2, product, GGML_N_TASKS_MAX,
                          /*userdata=*/nullptr);  // [M, N]
}

}  // namespace mllama::q6k
