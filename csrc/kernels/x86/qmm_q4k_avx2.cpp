// Q4_K matrices in ggml's repacked layout times F32 rows on AVX2 (kernels/dispatch.h's q4k_matmul): the text
// matrices that ggml's CPU_REPACK buffer holds as block_q4_Kx8 (8 output channels' blocks interleaved, 8 bytes
// of quants at a time), multiplied by a decode batch with each weight read once (prefill: passes of 8 rows).
// ggml's own product runs a batch of fewer than 4 rows as one pass over the weights per row and is
// compute-bound from 2 rows on AVX2 (figures in bench/README.md).
//
// The arithmetic is ggml's: x quantized to Q8_K values, per 32-weight sub-block an exact integer sum
// times the channel's 6-bit scale, minus the 6-bit min times the activations' sub-block sum, each block's
// two integer sums scaled by d and dmin (fp16) in float. A block of 8 channels has its scales and mins
// decoded once for all rows; per row, its nibbles are masked out of the quants (in L1 after the first
// row), vpmaddubsw multiplies 4 channels' 8 weights by the same 8 activations, four such products (one
// 32-weight sub-block) are summed in int16 (at most 4 * 2 * 15 * 127), and vpmaddwd applies the
// sub-block scales.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/q4k_block.h"
#include "kernels/x86/q8k_avx2.h"
#include "kernels/x86/simd_avx2.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>

namespace mllama {
namespace {

using q4k::block_mins;
using q4k::k_block;
using q4k::k_interleave;
using q4k::q4kx8_block;

// What every row needs of one block: per sub-block s and channel half h the scales as int16 (channel
// 4h + L / 4 in lane L, for vpmaddwd on vpmaddubsw's pair sums), and the mins and fp16 factors.
struct block_factors {
    __m256i scale16[8][2];
    block_mins mins;
};

MLLAMA_AVX2_TARGET inline void factors(const q4kx8_block & blk, block_factors & f) {
    __m128i sub[8];
    q4k::decode_scales(blk.scales, sub);
    // int16 lane L of half h: the scale byte of channel 4h + L / 4 (byte 8h + L / 4), zero-extended
    const __m256i c0 = _mm256_setr_epi8(0, -128, 0, -128, 0, -128, 0, -128, 1, -128, 1, -128, 1, -128, 1, -128,
                                        2, -128, 2, -128, 2, -128, 2, -128, 3, -128, 3, -128, 3, -128, 3, -128);
    const __m256i c1 = _mm256_add_epi8(c0, _mm256_setr_epi8(8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0,
                                                            8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0));
    for (int s = 0; s < 8; ++s) {
        const __m256i both = _mm256_broadcastsi128_si256(sub[s]);
        f.scale16[s][0] = _mm256_shuffle_epi8(both, c0);
        f.scale16[s][1] = _mm256_shuffle_epi8(both, c1);
    }
    q4k::mins_of(blk, sub, f.mins);
}

// acc += the block's 8 channel sums with one row (natural channel order). Byte offset 8i of each channel's
// quants (i = 4c + k) holds, for channels 4h..4h+3 in qs[64 i + 32 h], weights 64c + 8k + 0..7 in the low
// nibbles (sub-block 2c) and 64c + 32 + 8k + 0..7 in the high ones (sub-block 2c + 1).
MLLAMA_AVX2_TARGET inline __m256 row_block(const q4kx8_block & blk, const block_factors & f, const q8k_block & x,
                                           float d, __m256 acc) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i isum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int c = 0; c < 4; ++c) {
        __m256i lo[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, hi[2] = {lo[0], lo[0]};
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
            int64_t xl, xh;
            std::memcpy(&xl, x.qs + 64 * c + 8 * k, 8);
            std::memcpy(&xh, x.qs + 64 * c + 32 + 8 * k, 8);
            const __m256i bl = _mm256_set1_epi64x(xl), bh = _mm256_set1_epi64x(xh);
            for (int h = 0; h < 2; ++h) {  // int16: 4 products of at most 2 * 15 * 127
                const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.qs + 64 * (4 * c + k) + 32 * h));
                lo[h] = _mm256_add_epi16(lo[h], _mm256_maddubs_epi16(_mm256_and_si256(q, m4), bl));
                hi[h] = _mm256_add_epi16(hi[h], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), bh));
            }
        }
        for (int h = 0; h < 2; ++h) {
            isum[h] = _mm256_add_epi32(isum[h], _mm256_madd_epi16(lo[h], f.scale16[2 * c][h]));
            isum[h] = _mm256_add_epi32(isum[h], _mm256_madd_epi16(hi[h], f.scale16[2 * c + 1][h]));
        }
    }
    // lanes [0, 1, 4, 5 | 2, 3, 6, 7] after the pair sums -> natural order
    const __m256i natural = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    const __m256i sums = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(isum[0], isum[1]), natural);
    return q4k::finish_row(sums, f.mins, x, d, acc);
}

// One group of 8 channels against N rows (q4k::group_fn).
MLLAMA_AVX2_TARGET void group(const q4kx8_block * w, int64_t n_blocks, const q8k_block * const * x,
                              const float * const * d, int64_t N, float * out) {
    block_factors f;
    __m256 acc[k_q4k_max_rows];
    for (int64_t r = 0; r < N; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        q4k::prefetch_ahead_l1(w[b]);
        factors(w[b], f);
        for (int64_t r = 0; r < N; ++r) acc[r] = row_block(w[b], f, x[r][b], d[r][b], acc[r]);
    }
    for (int64_t r = 0; r < N; ++r) _mm256_storeu_ps(out + k_interleave * r, acc[r]);
}

// userdata: W [K, M] in the repacked layout.
void product(ggml_tensor * dst, int ith, int nth, void * userdata) {
    q4k::for_each_group(static_cast<const ggml_tensor *>(userdata), dst, ith, nth, group, k_qmm_max_rows);
}

}  // namespace

namespace q4k {

bool layout_supported(const ggml_tensor * w, const ggml_tensor * x) {
    if (!w || !x || w->type != GGML_TYPE_Q4_K || !in_repack_buffer(w)) return false;
    return ggml_type_size(GGML_TYPE_Q4_K) * k_interleave == sizeof(q4kx8_block) &&
           w->ne[0] % k_block == 0 && w->ne[0] > 0 && w->ne[1] % k_interleave == 0 && w->ne[2] == 1 && w->ne[3] == 1 &&
           ggml_is_contiguous(w) && x->type == GGML_TYPE_F32 && x->ne[0] == w->ne[0] && x->ne[1] >= 1 &&
           x->ne[2] == 1 && x->ne[3] == 1 && ggml_is_contiguous_rows(x) &&
           x->nb[0] == sizeof(float);
}

ggml_tensor * matmul_graph(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_custom_op_t product) {
    const int64_t K = w->ne[0], M = w->ne[1], N = x->ne[1];
    const int64_t bytes = q6k::activation_bytes(K, N, sizeof(q8k_block));
    ggml_tensor * xq = ggml_custom_4d(ctx, GGML_TYPE_I8, bytes, 1, 1, 1, &x, /*n_args=*/1, q8k_quantize_rows_avx2,
                                      GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // [bytes]
    // w goes in by userdata, not as a source: ggml's CPU backend lets the repack buffer type decide which
    // ops may read its tensors, and it accepts only mul_mat (w lives as long as the model)
    return ggml_custom_4d(ctx, GGML_TYPE_F32, M, N, 1, 1, &xq, /*n_args=*/1, product, GGML_N_TASKS_MAX, w);  // [M, N]
}

}  // namespace q4k

ggml_tensor * q4k_matmul_avx2(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return q4k::matmul_graph(ctx, w, x, product);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
