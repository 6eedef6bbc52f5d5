// The decode cross-attention's block step (kernels/x86/xattn.h), AVX2, for the AVX2 family (the AVX-512 BF16
// family runs xattn_avx512.cpp's form of it). The query group
// goes in quads of four heads: a pair of keys gives the quad's 8 scores in one ymm (8 F32 dot-product
// chains, one horizontal reduction for all 8), the softmax step runs on the four heads at once, and the
// value sums read each value row once per 16 channels for all four heads (8 accumulators). Keys the
// mask hides are dropped before any product; K and V are widened from F16 by F16C, sums are F32.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/simd_avx2.h"
#include "kernels/x86/xattn.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace mllama::xattn {
namespace {

// The totals of 8 vectors, in order, in one ymm: two levels of hadd leave each 128-bit half with the
// partial sums of its lanes, then the halves are added.
MLLAMA_AVX2_TARGET inline __m256 totals(const __m256 a[8]) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t, u, 0x20), _mm256_permute2f128_ps(t, u, 0x31));
}

// The dot products of two keys with the quad's queries: [k0.q0 .. k0.q3, k1.q0 .. k1.q3].
MLLAMA_AVX2_TARGET inline __m256 scores2(const float * const q[k_quad], const ggml_fp16_t * k0, const ggml_fp16_t * k1,
                                         int64_t D) {
    __m256 acc[2 * k_quad];
    for (auto & a : acc) a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        const __m256 a = widen(k0 + d), b = widen(k1 + d);
#pragma GCC unroll 4
        for (int g = 0; g < k_quad; ++g) {
            const __m256 qg = _mm256_loadu_ps(q[g] + d);
            acc[g] = _mm256_fmadd_ps(qg, a, acc[g]);
            acc[k_quad + g] = _mm256_fmadd_ps(qg, b, acc[k_quad + g]);
        }
    }
    return totals(acc);
}

// p[i] = the quad's scores of live key i (an odd count also fills p[n], dropped later); the next block's rows
// prefetched along the way (next: null for none).
MLLAMA_AVX2_TARGET void quad_scores(const ggml_tensor * k, int64_t h, const live_keys & keys, const float * const q[k_quad],
                                    int64_t D, float (*p)[k_quad], next_rows * next) {
    const int64_t n_pairs = (keys.n + 1) / 2, per_pair = next ? (next->n + n_pairs - 1) / n_pairs : 0;
    for (int64_t i = 0; i < keys.n; i += 2) {
        if (next) next->prefetch_until(next->done + per_pair);
        const int64_t i1 = std::min(i + 1, keys.n - 1);
        const __m256 bias = _mm256_setr_m128(_mm_set1_ps(keys.bias[i]), _mm_set1_ps(keys.bias[i1]));
        const __m256 s = scores2(q, row_of(k, h, keys.index[i]), row_of(k, h, keys.index[i1]), D);
        _mm256_store_ps(p[i], _mm256_add_ps(s, bias));
    }
}

// The online-softmax step of the quad's n_heads live heads: new maxima, old sums rescaled, p[i]
// turned into probabilities (p[n] zeroed).
MLLAMA_AVX2_TARGET void quad_softmax(query_state * qs, int64_t n_heads, int64_t n_live, int64_t D, float (*p)[k_quad]) {
    __m128 mx = _mm_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n_live; ++i) mx = _mm_max_ps(mx, _mm_load_ps(p[i]));
    alignas(16) float m_new[k_quad];
    _mm_store_ps(m_new, mx);  // finite: every key here is live
    for (int64_t g = 0; g < n_heads; ++g) {
        query_state & st = qs[g];
        m_new[g] = std::max(st.m, m_new[g]);
        if (m_new[g] == st.m) continue;
        const float alpha = std::exp(st.m - m_new[g]);  // 0 on the first live block
        for (int64_t d = 0; d < D; ++d) st.o[d] *= alpha;
        st.l *= alpha;
        st.m = m_new[g];
    }
    const __m256 m2 = _mm256_broadcast_ps(reinterpret_cast<const __m128 *>(m_new));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < n_live; i += 2) {
        __m256 e = simd::exp256(_mm256_sub_ps(_mm256_load_ps(p[i]), m2));
        if (i + 1 == n_live) e = _mm256_blend_ps(e, _mm256_setzero_ps(), 0xF0);  // p[n]: a repeated key
        _mm256_store_ps(p[i], e);
        sum = _mm256_add_ps(sum, e);
    }
    alignas(16) float l[k_quad];
    _mm_store_ps(l, _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1)));
    for (int64_t g = 0; g < n_heads; ++g) qs[g].l += l[g];
}

// o_g += sum_i p[i][g] v_i for the quad's live heads, 16 channels (2 ymm per head) at a time.
MLLAMA_AVX2_TARGET void quad_values(const ggml_tensor * v, int64_t h, const live_keys & keys, query_state * qs,
                                    int64_t n_heads, int64_t D, const float (*p)[k_quad]) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m256 acc[2 * k_quad];  // in registers: every loop over g is unrolled
#pragma GCC unroll 4
        for (int g = 0; g < k_quad; ++g) {
            const float * o = qs[g < n_heads ? g : 0].o + d0;  // a missing head: summed, not stored
            acc[2 * g] = _mm256_loadu_ps(o);
            acc[2 * g + 1] = _mm256_loadu_ps(o + 8);
        }
        for (int64_t i = 0; i < keys.n; ++i) {
            const ggml_fp16_t * vr = row_of(v, h, keys.index[i]) + d0;
            const __m256 v0 = widen(vr), v1 = widen(vr + 8);
#pragma GCC unroll 4
            for (int g = 0; g < k_quad; ++g) {
                const __m256 pg = _mm256_broadcast_ss(&p[i][g]);
                acc[2 * g] = _mm256_fmadd_ps(pg, v0, acc[2 * g]);
                acc[2 * g + 1] = _mm256_fmadd_ps(pg, v1, acc[2 * g + 1]);
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < k_quad; ++g) {
            if (g >= n_heads) break;
            _mm256_storeu_ps(qs[g].o + d0, acc[2 * g]);
            _mm256_storeu_ps(qs[g].o + d0 + 8, acc[2 * g + 1]);
        }
    }
}

}  // namespace

MLLAMA_AVX2_TARGET void group_block_avx2(const ggml_tensor * dst, const shape & s, int64_t h, const ggml_fp16_t * mrow,
                                         int64_t j0, int64_t n, query_state * qs, const bool * next_live) {
    live_keys keys;
    next_rows next{};
    if (!begin_block(dst, s, h, mrow, j0, n, next_live, keys, next)) return;
    alignas(32) float p[k_block + 1][k_quad];  // key i's scores, then probabilities, of the quad's heads
    for (int64_t g0 = 0; g0 < s.G; g0 += k_quad) {
        const quad_heads quad(qs, g0, s.G);
        quad_scores(dst->src[1], h, keys, quad.q, s.D, p, g0 == 0 && next.n > 0 ? &next : nullptr);
        quad_softmax(quad.heads, quad.n_heads, keys.n, s.D, p);
        quad_values(dst->src[2], h, keys, quad.heads, quad.n_heads, s.D, p);
    }
}

}  // namespace mllama::xattn

#endif  // MLLAMA_X86_KERNELS
