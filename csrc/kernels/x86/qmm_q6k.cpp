// Q6_K matrix times F32 rows on AVX-512 VNNI CPUs (see kernels/dispatch.h): the text matrices stored in ggml's
// Q6_K layout, which ggml can neither repack nor multiply by several rows at once without re-reading the
// weights (figures in bench/README.md); decode batches in one pass over the weights, prefill's in passes of 8.
//
// Like ggml, x is first quantized to 8-bit blocks of 256 (one float scale each; the same values as
// ggml's Q8_K, computed the same way), by a first custom op, once per call. The product op then walks
// its output channels: each weight block (256 weights: 4 bit ql, 2 bit qh, 16 int8 scales, fp16 d) is
// unpacked once into four zmm of unsigned 6-bit values and multiplied with every row's int8 block by
// vpdpbusd. The weights are offset by +32 in the file; the -32 goes in through the activations' per-16
// sums, which seed each row's accumulator. The four zmm are transposed (4x4 int32 within each 128-bit
// lane) so that int32 lane q of all four holds the same 16-weight sub-block: four vpdpbusd leave the 16
// sub-block sums in one zmm, converted to float and multiplied by the 16 sub-block scales (d times the
// int8 scale, exact in float) and the row's scale into a float accumulator per row, as ggml's dot
// product does per block. The activations are stored in
// the same transposed order when they are quantized. From four rows on, two adjacent output channels go
// together (channel_pair), so that each activation block loaded serves both, and all rows take one pass.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/q6k_block.h"
#include "kernels/x86/simd_math.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define MLLAMA_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace mllama {
namespace {

using q6k::k_block;
using q6k::q6k_block;

// One row's 256 activations as int8 (x ~ d q; d in q6k::activation_scales), in the transposed order of the
// unpacked weights, with -32 times each 16-element sub-block's sum in the matching int32 lane. 320 bytes, five
// cache lines: 8 rows of the 4096-wide output matrix take 40 KB and one pass (with d in the block, 384
// bytes, they took two: 1.2x the time).
struct q8_block {
    int8_t qs[k_block];
    int32_t neg_bsum32[16];
};
static_assert(sizeof(q8_block) == 320, "activation block layout");


// ggml's Q8_K quantization of 256 floats (quantize_row_q8_K_ref: scale -127 / the value of largest
// magnitude, the first one on ties; round half to even; at most 127), into the transposed order.
MLLAMA_VNNI_TARGET float quantize_block(const float * x, q8_block & out) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k_block; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    const float largest = _mm512_reduce_max_ps(amax);
    if (!(largest > 0.0f)) {  // all zeros (or NaN): ggml stores d = 0 and zero quants
        std::memset(&out, 0, sizeof(out));
        return 0.0f;
    }
    const float max = q6k::first_of_magnitude(x, largest);
    const float iscale = -127.0f / max;
    const __m512 scale = _mm512_set1_ps(iscale);
    __m512i natural[4];  // weights' unpacked order = natural order: register j holds elements 64j..64j+63
    for (int j = 0; j < 4; ++j) {
        __m128i parts[4];
        for (int p = 0; p < 4; ++p) {
            const __m512 scaled = _mm512_mul_ps(scale, _mm512_loadu_ps(x + 64 * j + 16 * p));
            const __m512i q = _mm512_cvtps_epi32(scaled);  // nearest, ties to even (MXCSR's default)
            parts[p] = _mm512_cvtsepi32_epi8(_mm512_min_epi32(q, _mm512_set1_epi32(127)));
        }
        natural[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(parts[1], parts[0])),
                                        _mm256_set_m128i(parts[3], parts[2]), 1);
    }
    __m512i t[4];
    simd::transpose4_in_lanes(natural, t);
    __m512i bsum = _mm512_setzero_si512();  // lane q: the sum of its sub-block (4 bytes in each t[k])
    for (int k = 0; k < 4; ++k) {
        _mm512_storeu_si512(out.qs + 64 * k, t[k]);
        bsum = _mm512_dpbusd_epi32(bsum, _mm512_set1_epi8(1), t[k]);
    }
    _mm512_storeu_si512(out.neg_bsum32, _mm512_mullo_epi32(bsum, _mm512_set1_epi32(-32)));
    return 1.0f / iscale;  // d
}

// dst->src[0] = x [K, N] F32 -> dst: N rows of K / 256 blocks and their scales (q6k::activation_rows).
void quantize_rows(ggml_tensor * dst, int ith, int nth, void *) {
    q6k::quantize_rows<q8_block, quantize_block>(dst, ith, nth);
}

// The 6-bit weights of one half block (128 weights) in two zmm, natural order: ql bytes 0..63 of the
// half give weights 0..63 (low nibbles) and 64..127 (high nibbles); the matching qh bits are byte l's
// bits 0-1 / 4-5 for the first 32 bytes and 2-3 / 6-7 for the next 32 (shifted down by 2 there).
MLLAMA_VNNI_TARGET inline void unpack_half(const uint8_t * ql, const uint8_t * qh, __m512i & lo, __m512i & hi) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30);
    const __m512i l = _mm512_loadu_si512(ql);
    const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(qh)));
    const __m512i up = _mm512_sllv_epi64(h, _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4));    // bits 0-1 / 2-3 -> 4-5
    const __m512i down = _mm512_srlv_epi64(h, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0));  // bits 4-5 / 6-7 -> 4-5
    lo = _mm512_ternarylogic_epi32(l, m4, _mm512_and_si512(up, m2), 0xEA);  // (l & m4) | up
    hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), m4, _mm512_and_si512(down, m2), 0xEA);
}

// Weight block *blk unpacked and transposed within lanes (simd::transpose4_in_lanes: weight register j's 128-bit lane
// L is one 16-weight sub-block, 4j + L, so afterwards int32 lane 4L + j of every t[k] belongs to sub-block 4j + L)
// with its 16 sub-block scales times d
// (an fp16 times an int8, exact in float), in the same lane order; the blocks ahead prefetched into L2, and into L1
// too where L1 (q6k::prefetch_ahead, q6k_weights_prefetch_l1: without them the product ran short of the memory's
// speed from 2 rows).
template <bool L1>
MLLAMA_VNNI_TARGET inline void load_block(const q6k_block * blk, __m512i t[4], __m512 & scales) {
    // lane 4L + j of the transposed registers is sub-block 4j + L: the scales' bytes in that order
    const __m128i scale_order = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    if constexpr (L1) q6k::prefetch_ahead(blk);
    else q6k::prefetch_ahead_l2(blk);
    __m512i n[4];
    unpack_half(blk->ql, blk->qh, n[0], n[1]);
    unpack_half(blk->ql + 64, blk->qh + 32, n[2], n[3]);
    simd::transpose4_in_lanes(n, t);  // t[k] lane 4L + j = n[j] lane 4L + k
    const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk->scales));
    const __m512i scales8 = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(sc8, scale_order));
    scales = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(blk->d)), _mm512_cvtepi32_ps(scales8));
}

// One output channel (a row of Q6_K blocks) against R activation rows (stride: blocks between rows).
template <int R, bool L1>
MLLAMA_VNNI_TARGET void channel(const q6k_block * w, int64_t n_blocks, const q8_block * x, const float * d,
                                int64_t stride, float * sums) {
    __m512 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        __m512i t[4];
        __m512 scales;
        load_block<L1>(w + b, t, scales);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const q8_block & xb = x[r * stride + b];
            __m512i isums = _mm512_dpbusd_epi32(_mm512_loadu_si512(xb.neg_bsum32), t[0], _mm512_loadu_si512(xb.qs));
            if constexpr (R == 1) {  // two dependency chains of two products each (vpdpbusd's latency is the bound)
                __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t[1], _mm512_loadu_si512(xb.qs + 64));
                isums = _mm512_dpbusd_epi32(isums, t[2], _mm512_loadu_si512(xb.qs + 128));
                s1 = _mm512_dpbusd_epi32(s1, t[3], _mm512_loadu_si512(xb.qs + 192));
                isums = _mm512_add_epi32(isums, s1);
            } else {  // one chain per row, the rows' chains side by side: no add (2-4% faster at 2-8 rows)
                isums = _mm512_dpbusd_epi32(isums, t[1], _mm512_loadu_si512(xb.qs + 64));
                isums = _mm512_dpbusd_epi32(isums, t[2], _mm512_loadu_si512(xb.qs + 128));
                isums = _mm512_dpbusd_epi32(isums, t[3], _mm512_loadu_si512(xb.qs + 192));
            }
            const __m512 sums = _mm512_cvtepi32_ps(isums);  // exact: |sum| < 2^18
            acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(scales, _mm512_set1_ps(d[r * stride + b])), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

// channel<R> for two adjacent output channels: each activation block is loaded once and feeds both
// channels' products; the sums and their order are channel<R>'s, so the results are the same bit for bit.
template <int R, bool L1>
MLLAMA_VNNI_TARGET void channel_pair(const q6k_block * w, const q6k_block * w_next, int64_t n_blocks,
                                     const q8_block * x, const float * d, int64_t stride, float * sums,
                                     float * sums_next) {
    __m512 acc[2][R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        __m512i t[2][4];
        __m512 scales[2];
        load_block<L1>(w + b, t[0], scales[0]);
        load_block<L1>(w_next + b, t[1], scales[1]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const q8_block & xb = x[r * stride + b];
            const __m512i seed = _mm512_loadu_si512(xb.neg_bsum32);
            __m512i s0 = seed, s1 = seed;
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) {
                const __m512i xk = _mm512_loadu_si512(xb.qs + 64 * k);
                s0 = _mm512_dpbusd_epi32(s0, t[0][k], xk);
                s1 = _mm512_dpbusd_epi32(s1, t[1][k], xk);
            }
            const __m512 dr = _mm512_set1_ps(d[r * stride + b]);
            acc[0][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(scales[0], dr), acc[0][r]);
            acc[1][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(scales[1], dr), acc[1][r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        sums[r] = _mm512_reduce_add_ps(acc[0][r]);
        sums_next[r] = _mm512_reduce_add_ps(acc[1][r]);
    }
}

// (q6k::k_pair_min_rows: fewer rows take channel<R>; the smaller pairs are there to fill the table)
template <bool L1>
constexpr q6k::pair_fn<q8_block> k_pairs[k_qmm_max_rows] = {
    channel_pair<1, L1>, channel_pair<2, L1>, channel_pair<3, L1>, channel_pair<4, L1>,
    channel_pair<5, L1>, channel_pair<6, L1>, channel_pair<7, L1>, channel_pair<8, L1>};

template <bool L1>
constexpr q6k::channel_fn<q8_block> k_channels[k_qmm_max_rows] = {
    channel<1, L1>, channel<2, L1>, channel<3, L1>, channel<4, L1>,
    channel<5, L1>, channel<6, L1>, channel<7, L1>, channel<8, L1>};

template <bool L1>
void product(ggml_tensor * dst, int ith, int nth, void *) {
    q6k::for_each_channel(dst, ith, nth, k_channels<L1>, k_pairs<L1>);
}

}  // namespace

bool q6k_matmul_supported(const ggml_tensor * w, const ggml_tensor * x) {
    return cpu_kernel_available(cpu_kernel::qmm) && w && x && w->type == GGML_TYPE_Q6_K &&
           ggml_type_size(GGML_TYPE_Q6_K) == sizeof(q6k_block) && ggml_blck_size(GGML_TYPE_Q6_K) == k_block &&
           w->ne[0] % k_block == 0 && w->ne[0] > 0 && ggml_is_contiguous(w) && w->ne[2] == 1 && w->ne[3] == 1 &&
           w->extra == nullptr && (!w->buffer || ggml_backend_buffer_is_host(w->buffer)) && x->type == GGML_TYPE_F32 &&
           x->ne[0] == w->ne[0] && x->ne[1] >= 1 && x->ne[2] == 1 && x->ne[3] == 1 &&
           ggml_is_contiguous_rows(x) && x->nb[0] == sizeof(float);
}

ggml_tensor * q6k_matmul_avx512(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return q6k::matmul_graph(ctx, w, x, sizeof(q8_block), quantize_rows,
                             q6k_weights_prefetch_l1(x->ne[1]) ? product<true> : product<false>);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
