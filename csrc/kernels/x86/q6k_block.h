// What the Q6_K kernel's forms share (kernels/dispatch.h's q6k_matmul; kernels/x86/qmm_q6k.cpp: AVX-512
// VNNI, qmm_q6k_avx2.cpp: AVX2): ggml's block layout, the Q8_K rule's choice of maximum, the split of
// output channels across threads and the two custom ops of the graph.
#pragma once

#include "kernels/dispatch.h"
#include "kernels/work_chunks.h"
#include "kernels/x86/cache_lines.h"

#include "ggml.h"

#include <immintrin.h>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace mllama::q6k {

constexpr int64_t k_block = 256;  // weights per Q6_K block (ggml's QK_K), activations per 8-bit block
// The forms prefetch the block this far ahead (8.4 KiB) into L1: one row took 1.15-1.4x the time (single
// core, from memory) with the 10 blocks ahead of the first version, which left the memory's latency exposed.
constexpr int64_t k_prefetch_blocks = 40;
// ... and, in the AVX-512 form, the block this far ahead (33 KiB) into L2 (the AVX2 form: prefetch_ahead_l1). Without
// it the products with several rows, whose arithmetic stalls the stream of L1 prefetches, left the memory idle: on
// Zen 4 (2 threads, output matrix) 4 rows took 1.35-1.5x the time, 8 rows 1.15-1.25x (80-320 blocks ahead: all within
// the noise of 160).
constexpr int64_t k_prefetch_l2_blocks = 160;

// ggml's block_q6_K (ggml-common.h), as it is in memory.
struct q6k_block {
    uint8_t ql[k_block / 2];      // low 4 bits: weight 128h + l + 32j in byte 64h + l + 32(j & 1), nibble j >> 1
    uint8_t qh[k_block / 4];      // high 2 bits: the same weight in byte 32h + l, bits 2j..2j+1
    int8_t scales[k_block / 16];  // one per 16 consecutive weights
    uint16_t d;                   // fp16 block scale
};
static_assert(sizeof(q6k_block) == 210, "Q6_K block layout");

// The n_lines cache lines from `near` bytes after p into L1 and those from `far` bytes after it into L2, as the
// quantized products' forms prefetch their weight blocks (a prefetch never faults: past a matrix's end they
// are only wasted).
inline void prefetch_lines(const void * p, int n_lines, int64_t near, int64_t far) {
    const auto base = reinterpret_cast<uintptr_t>(p);
    for (int line = 0; line < n_lines; ++line) {
        _mm_prefetch(reinterpret_cast<const char *>(base + near + k_cache_line * line), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char *>(base + far + k_cache_line * line), _MM_HINT_T1);
    }
}

// The n_lines cache lines from `far` bytes after p into L2 only.
inline void prefetch_lines_l2(const void * p, int n_lines, int64_t far) {
    const auto base = reinterpret_cast<uintptr_t>(p) + far;
    for (int line = 0; line < n_lines; ++line) {
        _mm_prefetch(reinterpret_cast<const char *>(base + k_cache_line * line), _MM_HINT_T1);
    }
}

// The weight block k_prefetch_blocks ahead of blk into L1, the one k_prefetch_l2_blocks ahead into L2 (the 210
// bytes span at most 4 lines).
inline void prefetch_ahead(const q6k_block * blk) {
    prefetch_lines(blk, 4, k_prefetch_blocks * sizeof(q6k_block), k_prefetch_l2_blocks * sizeof(q6k_block));
}

// The AVX-512 form where it prefetches into L2 only (q6k_weights_prefetch_l1 in kernels/dispatch.h): the block
// k_prefetch_l2_blocks ahead.
inline void prefetch_ahead_l2(const q6k_block * blk) {
    prefetch_lines_l2(blk, 4, k_prefetch_l2_blocks * sizeof(q6k_block));
}

// The n_lines cache lines from `near` bytes after p into L1 only.
inline void prefetch_lines_l1(const void * p, int n_lines, int64_t near) {
    const auto base = reinterpret_cast<uintptr_t>(p) + near;
    for (int line = 0; line < n_lines; ++line) {
        _mm_prefetch(reinterpret_cast<const char *>(base + k_cache_line * line), _MM_HINT_T0);
    }
}

// The AVX2 forms' prefetch (qmm_q6k_avx2.cpp, and q4k::prefetch_ahead_l1): into L1 only. They run natively on CPUs
// without AVX-512 (AMD Zen 1-3, Intel client cores): on a 2-core Zen 3 (2026-12-06, 2 threads, builds taking turns)
// the L2 prefetch made a one-row product slower, the 11B's Q6_K output matrix 15.8-18.4 ms against 13.9-16.8
// without it, its fused Q4_K gate/up product 3.1-4.1 against 2.4-3.1 (4 and 8 rows: alike or faster without), and
// a one-stream decode step of the 11B-dims model 38.8-42.2 ms against 36.4-39.8 (bench/README.md, "Zen 3 three
// days later"). The L2 prefetch's gains above were the AVX-512 forms' on Zen 4, and the AVX2 form's there only when
// forced.
inline void prefetch_ahead_l1(const q6k_block * blk) {
    prefetch_lines_l1(blk, 4, k_prefetch_blocks * sizeof(q6k_block));
}

// The first of x[0..256) whose magnitude is `largest`: ggml's Q8_K scale is -127 over it, sign included.
inline float first_of_magnitude(const float * x, float largest) {
    for (int64_t i = 0; i < k_block; ++i) {
        if (std::fabs(x[i]) == largest) return x[i];
    }
    return largest;
}

// The quantized activations xq: first the product's work state (work_state), then N rows of K / 256 blocks
// each, back to back from the next cache line boundary. ggml's buffers align tensors to 32 bytes only, and zmm
// loads that split two cache lines made the 8-row Q6_K product 1.3-2.2x slower; xq holds k_cache_line - 1
// bytes of slack for the alignment.
template <class Q8>
Q8 * activation_rows(const ggml_tensor * xq) {
    static_assert(sizeof(Q8) % 32 == 0, "activation blocks keep the rows' alignment");
    return line_aligned<Q8>(static_cast<char *>(xq->data) + work::k_state_bytes);
}

// After the rows: each (row, block)'s scale d (x ~ d q), row-major, n_blocks_total = N * K / 256 of them.
template <class Q8>
float * activation_scales(const ggml_tensor * xq, int64_t n_blocks_total) {
    return reinterpret_cast<float *>(activation_rows<Q8>(xq) + n_blocks_total);
}

inline int64_t activation_bytes(int64_t K, int64_t N, size_t q8_bytes) {
    return work::k_state_bytes + K / k_block * N * static_cast<int64_t>(q8_bytes + sizeof(float)) + k_cache_line - 1;
}

// The work state of the product that reads xq (work::claimer): xq's first bytes.
inline void * work_state(const ggml_tensor * xq) { return xq->data; }

// dst->src[0] = x [K, N] F32 (K % 256 == 0) -> dst: each row's K / 256 activation blocks, written by
// quantize, which returns the block's scale (activation_scales); (row, block) pairs split across threads; the
// product's work state reset.
// The body of the quantizing ops of the quantized products' forms (one per block layout).
template <class Q8, float (*quantize)(const float * x, Q8 & out)>
void quantize_rows(ggml_tensor * dst, int ith, int nth) {
    const ggml_tensor * x = dst->src[0];
    const int64_t n_blocks = x->ne[0] / k_block, total = n_blocks * x->ne[1];
    const int64_t per = (total + nth - 1) / nth, w0 = std::min(total, per * ith), w1 = std::min(total, w0 + per);
    if (ith == 0) work::reset(work_state(dst));
    Q8 * rows = activation_rows<Q8>(dst);
    float * scales = activation_scales<Q8>(dst, total);
    for (int64_t w = w0; w < w1; ++w) {
        const int64_t row = w / n_blocks, b = w % n_blocks;
        const auto * xr = reinterpret_cast<const float *>(static_cast<const char *>(x->data) + row * x->nb[1]);
        scales[w] = quantize(xr + b * k_block, rows[w]);
    }
}

// One output channel (a row of n_blocks Q6_K blocks) against R rows of activation blocks x and their scales d
// (stride: blocks between rows), one function per R = 1..k_qmm_max_rows: sums[r] = the channel's dot product
// with row r.
template <class Q8>
using channel_fn = void (*)(const q6k_block * w, int64_t n_blocks, const Q8 * x, const float * d, int64_t stride,
                            float * sums);

// Two adjacent output channels (w, and w_next the weight row after it) against the same R rows, each activation
// block read once for both: sums[r] and sums_next[r] (used from k_pair_min_rows rows on).
template <class Q8>
using pair_fn = void (*)(const q6k_block * w, const q6k_block * w_next, int64_t n_blocks, const Q8 * x, const float * d,
                         int64_t stride, float * sums, float * sums_next);

// Rows per pass when N rows go in passes of at most `most` rows: as few passes as may be, as even as may be.
inline int64_t even_passes(int64_t N, int64_t most) {
    const int64_t n_passes = (N + most - 1) / most;
    return (N + n_passes - 1) / n_passes;
}

// The L1 data cache's size: sysconf where the C library knows it, else 32 KiB (the smallest of the x86 families
// the kernels run on).
inline int64_t l1d_bytes() {
    static const int64_t bytes = [] {
#if defined(_SC_LEVEL1_DCACHE_SIZE)
        const long n = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        if (n >= (16 << 10) && n <= (4 << 20)) return static_cast<int64_t>(n);
#endif
        return static_cast<int64_t>(32) << 10;
    }();
    return bytes;
}

// Rows per pass over a chunk of weights, one channel at a time (the AVX2 form), for N rows of row_bytes
// activations: all of them where they fit in 7/8 of L1 (the rest holds the weights' prefetched blocks) and are at
// most k_qmm_max_rows (the channel functions' rows), else as few and even passes as may be, of at least 4 rows
// each (8 rows of ffn_down, whose activations never fit: passes of 2 took 1.06x the time of passes of 4).
// Activations that did not fit (8 rows of the 4096-wide output matrix in 384-byte blocks, 48 KB) made the 8-row
// Q6_K product take 1.7x its time; a pass's weights, read from memory by the first, come from L2 for the next.
inline int64_t rows_per_pass(int64_t N, int64_t row_bytes) {
    const int64_t fit = std::clamp<int64_t>(l1d_bytes() * 7 / 8 / std::max<int64_t>(1, row_bytes), 4, k_qmm_max_rows);
    return even_passes(N, fit);
}

// Output channels m0..m1 against rows r0..r0+rows-1, into dst [M, N]: in pairs where `pairs` is given, else
// one channel at a time.
template <class Q8>
void channel_range(ggml_tensor * dst, int64_t m0, int64_t m1, int64_t r0, int64_t rows, const Q8 * x, const float * d,
                   const channel_fn<Q8> (&channels)[k_qmm_max_rows], const pair_fn<Q8> * pairs) {
    const ggml_tensor * w = dst->src[0];
    const int64_t n_blocks = w->ne[0] / k_block;
    float sums[2][k_qmm_max_rows];
    for (int64_t m = m0; m < m1;) {
        const auto * wm = reinterpret_cast<const q6k_block *>(static_cast<const char *>(w->data) + m * w->nb[1]);
        const int64_t n_channels = pairs && m + 1 < m1 ? 2 : 1;
        if (n_channels == 2) {
            const auto * wn = reinterpret_cast<const q6k_block *>(reinterpret_cast<const char *>(wm) + w->nb[1]);
            pairs[rows - 1](wm, wn, n_blocks, x + r0 * n_blocks, d + r0 * n_blocks, n_blocks, sums[0], sums[1]);
        } else {
            channels[rows - 1](wm, n_blocks, x + r0 * n_blocks, d + r0 * n_blocks, n_blocks, sums[0]);
        }
        for (int64_t r = 0; r < rows; ++r) {
            auto * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + (r0 + r) * dst->nb[1]);
            for (int64_t c = 0; c < n_channels; ++c) out[m + c] = sums[c][r];
        }
        m += n_channels;
    }
}

// Rows from which channel pairs (pair_fn) pay: on Zen 4, one core, output matrix, two channels at a time took
// 1.5x the time at 2 rows and 1.3x at 3 (two weight rows streamed at once read the memory slower), about the
// same at 4, 0.75-0.8x at 5-8.
constexpr int64_t k_pair_min_rows = 4;

// dst [M, N] = W x^T; dst->src = {w [K, M] Q6_K, xq: N rows of Q8 blocks (activation_rows)}; output channels
// in chunks (work::chunks_of, work::claimer: <= 256 KiB of weights, which stay in L2 while the chunk's passes
// over the rows read them). With `pairs` (the AVX-512 form) and k_pair_min_rows rows or more, the rows go in
// passes of up to k_qmm_max_rows (one pass in decode), two channels at a time: each activation block then serves
// two channels' products, and the 8 rows of the output matrix, whose activations (40 KB) overflow a 32 KiB L1,
// took 0.7x the time of two passes of 4 rows one channel at a time (Zen 4, 2 threads; ffn_down 0.85x). Else
// each chunk takes the rows in passes of rows_per_pass (one pass wherever their activations fit L1). Prefill's
// batches go in passes of 8 as well: ggml's own product of a Q6_K matrix multiplies one row at a time.
template <class Q8>
void for_each_channel(ggml_tensor * dst, int ith, int nth, const channel_fn<Q8> (&channels)[k_qmm_max_rows],
                      const pair_fn<Q8> * pairs = nullptr) {
    const ggml_tensor * w = dst->src[0], * xq = dst->src[1];
    const int64_t n_blocks = w->ne[0] / k_block, M = w->ne[1], N = dst->ne[1];
    if (N < k_pair_min_rows) pairs = nullptr;
    const int64_t pass_rows = pairs ? even_passes(N, k_qmm_max_rows)
                                    : rows_per_pass(N, n_blocks * static_cast<int64_t>(sizeof(Q8)));
    const work::chunking chunks = work::chunks_of(M, static_cast<int64_t>(w->nb[1]), nth);
    const Q8 * x = activation_rows<Q8>(xq);
    const float * d = activation_scales<Q8>(xq, N * n_blocks);
    work::claimer claims(work_state(xq), chunks.count, ith, nth);
    for (int64_t c = 0; claims.next(c);) {
        const int64_t m0 = c * chunks.items, m1 = std::min(M, m0 + chunks.items);
        for (int64_t r0 = 0; r0 < N; r0 += pass_rows) {
            channel_range(dst, m0, m1, r0, std::min(pass_rows, N - r0), x, d, channels, pairs);
        }
    }
}

// x [K, N] quantized by `quantize` into K / 256 blocks of q8_bytes per row, then `product` -> [M, N].
inline ggml_tensor * matmul_graph(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, size_t q8_bytes,
                                  ggml_custom_op_t quantize, ggml_custom_op_t product) {
    const int64_t K = w->ne[0], M = w->ne[1], N = x->ne[1];
    ggml_tensor * xq = ggml_custom_4d(ctx, GGML_TYPE_I8, activation_bytes(K, N, q8_bytes), 1, 1, 1, &x, /*n_args=*/1,
                                      quantize, GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // [bytes]
    ggml_tensor * args[] = {w, xq};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, M, N, 1, 1, args, /*n_args=*/2, product, GGML_N_TASKS_MAX,
                          /*userdata=*/nullptr);  // [M, N]
}

}  // namespace mllama::q6k
