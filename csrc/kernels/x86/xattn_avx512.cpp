// The cross-attention's block step (kernels/x86/xattn.h), AVX-512, for the AVX-512 BF16 family: the AVX2 form's
// quads of four query heads on 16-float registers, so that a key costs half the instructions (on a 2-core Xeon
// with AMX the AVX2 form was bound by its arithmetic: 2.0 ms per layer against 0.85 to read the 26 MB of a
// 4-tile image's cache; bench/README.md). Four keys give the quad's 16 scores in one zmm (16 F32 dot-product
// chains, one transposing reduction for all 16), the softmax step takes four keys a register, and the value sums
// read each value row once per 64 channels for all four heads (16 accumulators). Keys the mask hides are dropped
// before any product; K and V are widened from F16, sums are F32.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/simd_math.h"
#include "kernels/x86/xattn.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace mllama::xattn {
namespace {

MLLAMA_AVX512_TARGET inline __m512 widen(const ggml_fp16_t * x) {  // 16 F16 -> 16 F32
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
}

// The totals of 16 vectors, in order, in one zmm: pairs interleaved and added (16 -> 8), then pairs of those
// (8 -> 4: each 128-bit lane holds its part of four totals), then the 128-bit lanes added across (4 -> 2 -> 1).
MLLAMA_AVX512_TARGET inline __m512 totals(const __m512 a[16]) {
    __m512 x[8], z[4], w[2];
    for (int i = 0; i < 8; ++i)
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d lo = _mm512_castps_pd(x[2 * i]), hi = _mm512_castps_pd(x[2 * i + 1]);
        z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
    }
    for (int i = 0; i < 2; ++i) {  // 128-bit lanes: 0x88 takes 0 and 2 of each, 0xDD 1 and 3
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0xDD));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// The dot products of four keys with the quad's queries: [k0.q0 .. k0.q3, k1.q0 .. k3.q3].
MLLAMA_AVX512_TARGET inline __m512 scores4(const float * const q[k_quad], const ggml_fp16_t * const k[4], int64_t D) {
    __m512 acc[4 * k_quad];
    for (auto & a : acc) a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        __m512 kd[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) kd[i] = widen(k[i] + d);
#pragma GCC unroll 4
        for (int g = 0; g < k_quad; ++g) {
            const __m512 qg = _mm512_loadu_ps(q[g] + d);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) acc[k_quad * i + g] = _mm512_fmadd_ps(qg, kd[i], acc[k_quad * i + g]);
        }
    }
    return totals(acc);
}

// p[i] = the quad's scores of live key i, four keys a register (keys.n rounded up to 4: the padding's copies of
// the last key have bias -inf, so probability 0); the next block's rows prefetched along the way (next: null for
// none).
MLLAMA_AVX512_TARGET void quad_scores(const ggml_tensor * k, int64_t h, const live_keys & keys,
                                      const float * const q[k_quad], int64_t D, float (*p)[k_quad], next_rows * next) {
    const int64_t n_groups = (keys.n + 3) / 4, per_group = next ? (next->n + n_groups - 1) / n_groups : 0;
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);  // key i's bias: 4 lanes
    for (int64_t i = 0; i < keys.n; i += 4) {
        if (next) next->prefetch_until(next->done + per_group);
        const ggml_fp16_t * rows[4];
        for (int r = 0; r < 4; ++r) rows[r] = row_of(k, h, keys.index[i + r]);
        const __m512 bias = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(keys.bias + i)));
        _mm512_store_ps(p[i], _mm512_add_ps(scores4(q, rows, D), bias));
    }
}

// The online-softmax step of the quad's n_heads live heads over n_keys keys (a multiple of 4): new maxima, old
// sums rescaled, p[i] turned into probabilities.
MLLAMA_AVX512_TARGET void quad_softmax(query_state * qs, int64_t n_heads, int64_t n_keys, int64_t D,
                                       float (*p)[k_quad]) {
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n_keys; i += 4) mx = _mm512_max_ps(mx, _mm512_load_ps(p[i]));
    const __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(mx), _mm512_extractf32x8_ps(mx, 1));
    alignas(16) float m_new[k_quad];
    _mm_store_ps(m_new, _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1)));  // finite: a key is live
    for (int64_t g = 0; g < n_heads; ++g) {
        query_state & st = qs[g];
        m_new[g] = std::max(st.m, m_new[g]);
        if (m_new[g] == st.m) continue;
        const float alpha = std::exp(st.m - m_new[g]);  // 0 on the first live block
        const __m512 a = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(st.o + d, _mm512_mul_ps(_mm512_loadu_ps(st.o + d), a));
        st.l *= alpha;
        st.m = m_new[g];
    }
    const __m512 m4 = _mm512_broadcast_f32x4(_mm_load_ps(m_new));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_keys; i += 4) {
        const __m512 e = simd::exp512(_mm512_sub_ps(_mm512_load_ps(p[i]), m4));  // a padded key: e^-inf = 0
        _mm512_store_ps(p[i], e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(sum), _mm512_extractf32x8_ps(sum, 1));
    alignas(16) float l[k_quad];
    _mm_store_ps(l, _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)));
    for (int64_t g = 0; g < n_heads; ++g) qs[g].l += l[g];
}

// o_g[d0 .. d0 + 16 V] += sum_i p[i][g] v_i[d0 ..] for the quad's live heads (V registers per head).
template <int V>
MLLAMA_AVX512_TARGET void quad_values_at(const ggml_tensor * v, int64_t h, const live_keys & keys, query_state * qs,
                                         int64_t n_heads, int64_t d0, const float (*p)[k_quad]) {
    __m512 acc[V * k_quad];  // in registers: every loop here is unrolled
#pragma GCC unroll 4
    for (int g = 0; g < k_quad; ++g) {
        const float * o = qs[g < n_heads ? g : 0].o + d0;  // a missing head: summed, not stored
#pragma GCC unroll 4
        for (int c = 0; c < V; ++c) acc[V * g + c] = _mm512_loadu_ps(o + 16 * c);
    }
    for (int64_t i = 0; i < keys.n; ++i) {
        const ggml_fp16_t * vr = row_of(v, h, keys.index[i]) + d0;
        __m512 vc[V];
#pragma GCC unroll 4
        for (int c = 0; c < V; ++c) vc[c] = widen(vr + 16 * c);
#pragma GCC unroll 4
        for (int g = 0; g < k_quad; ++g) {
            const __m512 pg = _mm512_set1_ps(p[i][g]);
#pragma GCC unroll 4
            for (int c = 0; c < V; ++c) acc[V * g + c] = _mm512_fmadd_ps(pg, vc[c], acc[V * g + c]);
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < k_quad; ++g) {
        if (g >= n_heads) break;
#pragma GCC unroll 4
        for (int c = 0; c < V; ++c) _mm512_storeu_ps(qs[g].o + d0 + 16 * c, acc[V * g + c]);
    }
}

// The value sums over all D channels: 64 at a time, then 16 (D is a multiple of 16).
MLLAMA_AVX512_TARGET void quad_values(const ggml_tensor * v, int64_t h, const live_keys & keys, query_state * qs,
                                      int64_t n_heads, int64_t D, const float (*p)[k_quad]) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) quad_values_at<4>(v, h, keys, qs, n_heads, d0, p);
    for (; d0 < D; d0 += 16) quad_values_at<1>(v, h, keys, qs, n_heads, d0, p);
}

}  // namespace

MLLAMA_AVX512_TARGET void group_block_avx512(const ggml_tensor * dst, const shape & s, int64_t h,
                                             const ggml_fp16_t * mrow, int64_t j0, int64_t n, query_state * qs,
                                             const bool * next_live) {
    live_keys keys;
    next_rows next{};
    if (!begin_block(dst, s, h, mrow, j0, n, next_live, keys, next)) return;
    const int64_t n_keys = (keys.n + 3) / 4 * 4;  // in fours: the last four padded with the last key, hidden
    for (int64_t i = keys.n; i < n_keys; ++i) {
        keys.index[i] = keys.index[keys.n - 1];
        keys.bias[i] = -std::numeric_limits<float>::infinity();
    }
    alignas(64) float p[k_block][k_quad];  // key i's scores, then probabilities, of the quad's heads
    for (int64_t g0 = 0; g0 < s.G; g0 += k_quad) {
        const quad_heads quad(qs, g0, s.G);
        quad_scores(dst->src[1], h, keys, quad.q, s.D, p, g0 == 0 && next.n > 0 ? &next : nullptr);
        quad_softmax(quad.heads, quad.n_heads, n_keys, s.D, p);
        quad_values(dst->src[2], h, keys, quad.heads, quad.n_heads, s.D, p);
    }
}

}  // namespace mllama::xattn

#endif  // MLLAMA_X86_KERNELS
