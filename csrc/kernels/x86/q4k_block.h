// What the Q4_K kernel's forms share (kernels/dispatch.h's q4k_matmul; kernels/x86/qmm_q4k_avx2.cpp: AVX2,
// qmm_q4k_avx512.cpp: AVX-512 VNNI): ggml's repacked block layout, the decoding of its packed scales and
// mins, the per-row finish of a block (mins and fp16 scales), the split of channel groups across threads
// and the graph's two custom ops. Every function here needs the AVX2 target: call them only from functions
// compiled with MLLAMA_AVX2_TARGET or a superset of it.
#pragma once

#include "kernels/dispatch.h"
#include "kernels/x86/q6k_block.h"
#include "kernels/x86/q8k_avx2.h"
#include "kernels/x86/simd_avx2.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mllama::q4k {

constexpr int64_t k_block = 256;     // weights per Q4_K block
constexpr int64_t k_interleave = 8;  // channels per repacked block

// ggml's block_q4_Kx8 (ggml-cpu/repack.h, libggml-python 0.20.2): the blocks of channels 8g..8g+7 at one
// k offset. qs: 8 bytes of channel i % 8 at byte offset 8 (i / 8) of its block_q4_K qs, for i = 0..127;
// scales: per sub-block s, 12 bytes (at 12 s for s < 4, 48 + 12 (s - 4) after) packing the 8 channels'
// 6-bit scales and mins (make_block_q4_Kx8 in ggml-cpu/repack.cpp).
struct q4kx8_block {
    uint16_t d[k_interleave], dmin[k_interleave];  // fp16
    uint8_t scales[96];
    uint8_t qs[k_block * k_interleave / 2];
};
static_assert(sizeof(q4kx8_block) == 1152, "block_q4_Kx8 layout");

// w lives in ggml's CPU_REPACK buffer (its extra: the repacked layout, block_q4_Kx8 for Q4_K).
inline bool in_repack_buffer(const ggml_tensor * w) {
    return w->buffer && w->extra &&
           std::strcmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer)), "CPU_REPACK") == 0;
}

// One block's scales and mins, sub-block s in sub[s]: bytes [scale ch0-3, min ch0-3, scale ch4-7, min ch4-7].
// packed: the block's scales, followed by its quants.
MLLAMA_AVX2_TARGET inline void decode_scales(const uint8_t * packed, __m128i sub[8]) {
    const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15), top2 = _mm_set1_epi8(static_cast<char>(0xC0));
    const __m128i low_half = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128i nibbles = _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, 8, 9, 10, 11, 8, 9, 10, 11);
    const __m128i to_high = _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m128i first4 = _mm_setr_epi32(-1, 0, -1, 0);  // within the high half: bytes 8-11 of 8-15
    for (int s = 0; s < 8; ++s) {
        // the sub-block's 12 bytes and 4 more, unused (within the block: its quants follow the scales)
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i *>(packed + (s < 4 ? 12 * s : 48 + 12 * (s - 4))));
        const __m128i low6 = _mm_and_si128(_mm_and_si128(b, m6), low_half);                      // ch0-3
        const __m128i high2 = _mm_shuffle_epi8(_mm_srli_epi16(_mm_and_si128(b, top2), 2), to_high);  // bits 4-5
        const __m128i n = _mm_shuffle_epi8(b, nibbles);  // bytes 8-11 twice: scales' low nibbles, then mins' high ones
        const __m128i n4 = _mm_blendv_epi8(_mm_and_si128(_mm_srli_epi16(n, 4), m4), _mm_and_si128(n, m4), first4);
        sub[s] = _mm_or_si128(low6, _mm_or_si128(high2, _mm_andnot_si128(low_half, n4)));
    }
}

// What every row needs of a block for its mins and fp16 scales: per sub-block pair p the 8 channels' mins
// as int16 pairs (m(ch, 2p), m(ch, 2p + 1)), and d, dmin in float (natural channel order).
struct block_mins {
    __m256i min_pairs[4];
    __m256 d, dmin;
};

MLLAMA_AVX2_TARGET inline void mins_of(const q4kx8_block & blk, const __m128i sub[8], block_mins & f) {
    const __m128i mins = _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, -128, -128, -128, -128, -128, -128, -128, -128);
    for (int p = 0; p < 4; ++p) {
        const __m128i pairs = _mm_unpacklo_epi8(_mm_shuffle_epi8(sub[2 * p], mins), _mm_shuffle_epi8(sub[2 * p + 1], mins));
        f.min_pairs[p] = _mm256_cvtepu8_epi16(pairs);
    }
    f.d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk.d)));
    f.dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk.dmin)));
}

// acc + the block's 8 channel results with row x, given their exact integer sums of scale times quants
// times activations (natural channel order): minus dmin times the mins' products with the activations'
// sub-block sums, each term scaled by the fp16 factor and the row's scale d, as ggml's product does.
MLLAMA_AVX2_TARGET inline __m256 finish_row(__m256i sums, const block_mins & f, const q8k_block & x, float d,
                                            __m256 acc) {
    __m256i msum = _mm256_setzero_si256();
    for (int p = 0; p < 4; ++p) {  // the activations' 32-sums of sub-blocks 2p and 2p + 1, as an int16 pair
        const __m256i pair = _mm256_set1_epi32(static_cast<int32_t>(x.bsum_pairs[p]));
        msum = _mm256_add_epi32(msum, _mm256_madd_epi16(f.min_pairs[p], pair));
    }
    const __m256 dx = _mm256_set1_ps(d);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(f.d, dx), acc);
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(f.dmin, dx), acc);
}

// The AVX-512 form on Intel (weights_prefetch_l1 in kernels/dispatch.h): eight blocks ahead (9 KiB) into L1, as the
// Q6_K kernel does (two, the first version's distance, took 1.05-1.2x the time for 1-4 rows, measured with the AVX2
// form on Zen 4), and 24 ahead (27 KiB) into L2 (as q6k::k_prefetch_l2_blocks; without it, the AVX2 form forced on
// Zen 4, 2 threads, took 1.2-1.4x the time for an 11B gate matrix at 1-4 rows; 16-64 ahead were alike).
constexpr int64_t k_prefetch_blocks = 8;
constexpr int64_t k_prefetch_l2_blocks = 24;

MLLAMA_AVX2_TARGET inline void prefetch_ahead(const q4kx8_block & blk) {  // 1152 bytes: 18 lines
    q6k::prefetch_lines(&blk, 18, k_prefetch_blocks * sizeof(q4kx8_block), k_prefetch_l2_blocks * sizeof(q4kx8_block));
}

// The AVX2 form: into L1 only, eight blocks ahead (where it runs natively, on CPUs without AVX-512, the L2 prefetch
// made it slower: q6k::prefetch_ahead_l1).
MLLAMA_AVX2_TARGET inline void prefetch_ahead_l1(const q4kx8_block & blk) {
    q6k::prefetch_lines_l1(&blk, 18, k_prefetch_blocks * sizeof(q4kx8_block));
}

// The AVX-512 form off Intel: into L2 only, 24 blocks ahead (its L1 prefetches cost 15 of its 112 cycles per block at
// one row; on Zen 4, 2 threads, without them 1 row read the weights at 40-46 GB/s where it had read 35-39 and 8 rows
// took 3% less time, 4 and 64 rows alike; the AVX2 form and the Q6_K kernel gained nothing: bench/README.md). On
// Intel it prefetches into both (prefetch_ahead; weights_prefetch_l1 in kernels/dispatch.h).
MLLAMA_AVX2_TARGET inline void prefetch_ahead_l2(const q4kx8_block & blk) {
    q6k::prefetch_lines_l2(&blk, 18, k_prefetch_l2_blocks * sizeof(q4kx8_block));
}

// One group of 8 channels (its n_blocks blocks from w) against N rows (x[r]: row r's activation blocks, d[r]:
// their scales): out[8 r + i] = channel i's result with row r. A form's inner loop.
using group_fn = void (*)(const q4kx8_block * w, int64_t n_blocks, const q8k_block * const * x, const float * const * d,
                          int64_t N, float * out);

// dst [M, N] = W x^T; dst->src[0] = xq (q8k_quantize_rows_avx2, q6k::activation_rows), w = W [K, M] in the
// repacked layout; groups of 8 channels in chunks (work::chunks_of, work::claimer). Up to max_rows rows go in one
// pass over the weights: passes over 256 KB of them (as the Q6_K kernel makes, to keep the activations in L1)
// took 1.03-1.3x the time at 8-64 rows. More rows (prefill) go in even passes of up to max_rows over each chunk,
// whose weights stay in L2 between passes (ggml's own repacked product ran 1.9-2x slower at 65-512 rows on Zen 4
// than the AVX-512 form, 1.3-1.5x slower at 16-200 rows than the AVX2 form in passes of 8).
inline void for_each_group(const ggml_tensor * w, ggml_tensor * dst, int ith, int nth, group_fn group,
                           int64_t max_rows) {
    const ggml_tensor * xq = dst->src[0];
    const int64_t n_blocks = w->ne[0] / k_block, n_groups = w->ne[1] / k_interleave, N = dst->ne[1];
    const int64_t pass_rows = q6k::even_passes(N, std::min(max_rows, k_q4k_max_rows));
    const work::chunking chunks = work::chunks_of(n_groups, n_blocks * static_cast<int64_t>(sizeof(q4kx8_block)), nth);
    const q8k_block * rows = q6k::activation_rows<q8k_block>(xq);
    const float * scales = q6k::activation_scales<q8k_block>(xq, N * n_blocks);
    float out[k_interleave * k_q4k_max_rows];
    work::claimer claims(q6k::work_state(xq), chunks.count, ith, nth);
    for (int64_t c = 0; claims.next(c);) {
        for (int64_t r0 = 0; r0 < N; r0 += pass_rows) {
            const int64_t n = std::min(pass_rows, N - r0);
            const q8k_block * x[k_q4k_max_rows];
            const float * d[k_q4k_max_rows];
            for (int64_t r = 0; r < n; ++r) x[r] = rows + (r0 + r) * n_blocks, d[r] = scales + (r0 + r) * n_blocks;
            for (int64_t g = c * chunks.items; g < std::min(n_groups, (c + 1) * chunks.items); ++g) {
                group(static_cast<const q4kx8_block *>(w->data) + g * n_blocks, n_blocks, x, d, n, out);
                for (int64_t r = 0; r < n; ++r) {  // dst [M, N]
                    std::memcpy(static_cast<char *>(dst->data) + (r0 + r) * dst->nb[1] + g * k_interleave * sizeof(float),
                                out + k_interleave * r, k_interleave * sizeof(float));
                }
            }
        }
    }
}

// The shapes and layout the forms take (w in ggml's CPU_REPACK buffer; x: F32 rows).
bool layout_supported(const ggml_tensor * w, const ggml_tensor * x);

// x [K, N] quantized to Q8_K rows (q8k_quantize_rows_avx2), then `product` (userdata: w) -> [M, N].
ggml_tensor * matmul_graph(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_custom_op_t product);

}  // namespace mllama::q4k
