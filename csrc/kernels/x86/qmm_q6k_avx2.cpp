// The Q6_K matrix times F32 rows (kernels/dispatch.h's q6k_matmul; passes of up to 8), its AVX2 form: CPUs without
// AVX-512 VNNI (AMD Zen 1-3, Intel client cores, older Xeons). The arithmetic is ggml's: x quantized to
// Q8_K values (int8 blocks of 256, one float scale, per-16 sums), the block's integer sum exact in int32,
// then one float multiply-add per block.
//
// The product walks its output channels; each weight block (256 weights) goes in 8 chunks of 32: a
// chunk's 6-bit weights are rebuilt in one ymm (4 low bits from ql, 2 high bits from qh) with its two
// sub-blocks' int8 scales widened to int16 beside it, and every row multiplies it by vpmaddubsw (u8 x s8
// pairs, at most 2 * 63 * 127: no saturation) and vpmaddwd with the scales into 8 int32 sums. The
// weights are stored +32: the -32 enters each row's block sum through its per-16 activation sums.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/q6k_block.h"
#include "kernels/x86/q8k_avx2.h"
#include "kernels/x86/simd_avx2.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace mllama {
namespace {

using q6k::k_block;
using q6k::q6k_block;
using q8_block = q8k_block;

// ggml's Q8_K quantization of 256 floats (quantize_row_q8_K_ref: scale -127 / the value of largest
// magnitude, the first one on ties; round half to even; at most 127).
MLLAMA_AVX2_TARGET float quantize_block(const float * x, q8_block & out) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < k_block; i += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(abs_mask, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float largest = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    if (!(largest > 0.0f)) {  // all zeros (or NaN): ggml stores d = 0 and zero quants
        std::memset(&out, 0, sizeof(out));
        return 0.0f;
    }
    const float max = q6k::first_of_magnitude(x, largest);
    const float iscale = -127.0f / max;
    const __m256 scale = _mm256_set1_ps(iscale);
    for (int64_t i = 0; i < k_block; i += 32) {
        __m256i q[4];
        for (int p = 0; p < 4; ++p) {  // nearest, ties to even (MXCSR's default), at most 127
            q[p] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(scale, _mm256_loadu_ps(x + i + 8 * p))),
                                    _mm256_set1_epi32(127));
        }
        // packs interleave 128-bit lanes: int32 lanes (0-3 of q0, 0-3 of q1, 4-7 of q0, 4-7 of q1), then bytes likewise
        const __m256i q16a = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out.qs + i), q8);
        // the two 16-sums of these 32 values: int8 -> int16 pairs summed by vpmaddubsw with ones, then 8 -> 1
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q8);  // [16] int16: sums of 2
        const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));  // [8] int32: sums of 4
        const __m256i eights = _mm256_hadd_epi32(quads, quads);                // lanes 0-1 / 4-5: sums of 8
        out.bsums[i / 16] = static_cast<int16_t>(_mm256_extract_epi32(eights, 0) + _mm256_extract_epi32(eights, 1));
        out.bsums[i / 16 + 1] = static_cast<int16_t>(_mm256_extract_epi32(eights, 4) + _mm256_extract_epi32(eights, 5));
    }
    const float d = 1.0f / iscale;
    for (int p = 0; p < 4; ++p) {  // |sum of 32| <= 32 * 127: exact in int16
        const auto lo = static_cast<uint16_t>(out.bsums[4 * p] + out.bsums[4 * p + 1]);
        const auto hi = static_cast<uint16_t>(out.bsums[4 * p + 2] + out.bsums[4 * p + 3]);
        out.bsum_pairs[p] = lo | static_cast<uint32_t>(hi) << 16;
    }
    return d;
}

}  // namespace

// dst->src[0] = x [K, N] F32 -> dst: N rows of K / 256 blocks and their scales (q6k::activation_rows).
void q8k_quantize_rows_avx2(ggml_tensor * dst, int ith, int nth, void *) {
    q6k::quantize_rows<q8_block, quantize_block>(dst, ith, nth);
}

namespace {

// pshufb controls that put scale 2c (low 128 bits) and 2c + 1 (high) in the high byte of every int16 lane
// (an arithmetic shift right by 8 then sign-extends it): chunk c's two sub-blocks.
struct scale_controls {
    alignas(32) int8_t bytes[8][32];
    scale_controls() {
        for (int c = 0; c < 8; ++c)
            for (int i = 0; i < 32; ++i) bytes[c][i] = static_cast<int8_t>(i % 2 ? 2 * c + i / 16 : -128);
    }
};
const scale_controls k_scale_controls;

// Chunk c (weights 32c..32c+31) of a block as unsigned 6-bit bytes: half h = c / 4, j = c % 4: the low
// bits are ql[64h + 32(j & 1) + l]'s nibble j / 2, the high bits qh[32h + l]'s bits 2j, 2j + 1.
MLLAMA_AVX2_TARGET inline __m256i chunk(const q6k_block & blk, int c) {
    const int h = c / 4, j = c % 4;
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.ql + 64 * h + 32 * (j & 1)));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.qh + 32 * h));
    const __m256i low4 = _mm256_and_si256(j < 2 ? l : _mm256_srli_epi16(l, 4), _mm256_set1_epi8(0x0F));
    const __m256i high2 = j == 0 ? _mm256_slli_epi16(hi, 4) : j == 1 ? _mm256_slli_epi16(hi, 2)
                          : j == 2 ? hi : _mm256_srli_epi16(hi, 2);  // bits 2j, 2j + 1 -> 4, 5
    return _mm256_or_si256(low4, _mm256_and_si256(high2, _mm256_set1_epi8(0x30)));
}

// One output channel (a row of Q6_K blocks) against R activation rows (stride: blocks between rows).
template <int R>
MLLAMA_AVX2_TARGET void channel(const q6k_block * w, int64_t n_blocks, const q8_block * x, const float * d,
                                int64_t stride, float * sums) {
    alignas(32) float acc[R][8] = {};  // in memory: with R = 8 the int32 sums take half the registers
    for (int64_t b = 0; b < n_blocks; ++b) {
        const q6k_block & blk = w[b];
        q6k::prefetch_ahead_l1(w + b);  // the hardware prefetcher alone left the product short of the memory's speed
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk.scales));
        const __m256i both = _mm256_broadcastsi128_si256(sc8);
        __m256i isum[R];
        const __m256i scales16 = _mm256_cvtepi8_epi16(sc8);
        for (int r = 0; r < R; ++r) {  // -32 sum_j scale_j bsum_j: the weights' +32
            const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[r * stride + b].bsums));
            isum[r] = _mm256_slli_epi32(_mm256_madd_epi16(scales16, bs), 5);
            isum[r] = _mm256_sub_epi32(_mm256_setzero_si256(), isum[r]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
            const __m256i q = chunk(blk, c);
            const __m256i ctrl = _mm256_load_si256(reinterpret_cast<const __m256i *>(k_scale_controls.bytes[c]));
            const __m256i sc = _mm256_srai_epi16(_mm256_shuffle_epi8(both, ctrl), 8);  // [16] int16: 2c x8, 2c+1 x8
            for (int r = 0; r < R; ++r) {
                const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[r * stride + b].qs + 32 * c));
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), sc));
            }
        }
        const float dw = _cvtsh_ss(blk.d);
        for (int r = 0; r < R; ++r) {  // int32 -> float rounds past 2^24 (32 products of up to 2^20 per lane), as ggml's
            const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(dw * d[r * stride + b]));
            _mm256_store_ps(acc[r], _mm256_add_ps(_mm256_load_ps(acc[r]), scaled));
        }
    }
    for (int r = 0; r < R; ++r) sums[r] = simd::hsum256(_mm256_load_ps(acc[r]));
}

constexpr q6k::channel_fn<q8_block> k_channels[k_qmm_max_rows] = {channel<1>, channel<2>, channel<3>, channel<4>,
                                                                   channel<5>, channel<6>, channel<7>, channel<8>};

void product(ggml_tensor * dst, int ith, int nth, void *) { q6k::for_each_channel(dst, ith, nth, k_channels); }

}  // namespace

ggml_tensor * q6k_matmul_avx2(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return q6k::matmul_graph(ctx, w, x, sizeof(q8_block), q8k_quantize_rows_avx2, product);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
