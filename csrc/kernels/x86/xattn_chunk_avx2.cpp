// The prefill block step of the attention kernel over F16 caches (kernels/x86/xattn.h), AVX2: every query row of a
// chunk of tokens (tokens x the query group of one KV head: 32 rows for 8 tokens over Llama 3.2's groups of 4) over
// one block of keys at once, as two small GEMMs. The per-token step (xattn_avx2.cpp) widens each key and value row
// from F16 again for every token and holds its scores to a pair of keys a pass; here the block's keys are widened and
// transposed once into 16-key strips ([D][16] F32 each, 32 KiB a block at D = 128), each micro step multiplies 5
// query rows by one strip (10 ymm sums, two key loads and five query broadcasts a channel), and the value sums take
// 5 rows by 16 channels (each value row widened once per 5 rows). Masked keys get probability 0; F32 throughout, as
// the per-token step. Prefill's attention 0.7-0.9x the per-token step's time on Zen 3 (bench/README.md).
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/simd_avx2.h"
#include "kernels/x86/xattn.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace mllama::xattn {
namespace {

constexpr int k_micro_rows = 5;  // query rows per micro step (10 ymm sums, as the vision tower's AVX2 attention)
constexpr float k_neg_inf = -std::numeric_limits<float>::infinity();

// r[i] lane j <- r[j] lane i (an 8 x 8 transpose of floats).
MLLAMA_AVX2_TARGET inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

// kt[i / 16][d][i % 16] = K row j0 + i of head h, channel d, for i < n_keys (n16: n_keys rounded up to 16; the
// rest zeros): 16-key strips of [D][16], each read in order by a micro step.
MLLAMA_AVX2_TARGET void widen_keys(const ggml_tensor * k, int64_t h, int64_t j0, int64_t n_keys, int64_t n16, int64_t D,
                                   float * kt) {
    for (int64_t i8 = 0; i8 < n16; i8 += 8)
        for (int64_t d8 = 0; d8 < D; d8 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) {
                r[i] = i8 + i < n_keys ? widen(row_of(k, h, j0 + i8 + i) + d8) : _mm256_setzero_ps();
            }
            transpose8(r);
            float * strip = kt + i8 / 16 * D * 16 + i8 % 16;  // keys i8 / 16 * 16 .. + 16: [D][16]
            for (int i = 0; i < 8; ++i) _mm256_store_ps(strip + (d8 + i) * 16, r[i]);
        }
}

// s[r][i] = q_r . key i for R rows and keys i0..i0 + 16 (kt: their [D][16] strip).
template <int R>
MLLAMA_AVX2_TARGET void micro_scores(query_state * const * rows, const float * kt, int64_t D, int64_t i0, float * s) {
    __m256 acc[R][2];
    for (auto & a : acc) a[0] = a[1] = _mm256_setzero_ps();
    const float * q[R];  // in registers, not reloaded from the states each channel
    for (int r = 0; r < R; ++r) q[r] = rows[r]->q;
    for (int64_t d = 0; d < D; ++d) {
        const __m256 k0 = _mm256_load_ps(kt + d * 16), k1 = _mm256_load_ps(kt + d * 16 + 8);
#pragma GCC unroll 5
        for (int r = 0; r < R; ++r) {
            const __m256 qd = _mm256_broadcast_ss(q[r] + d);
            acc[r][0] = _mm256_fmadd_ps(qd, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qd, k1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm256_store_ps(s + r * k_block + i0, acc[r][0]);
        _mm256_store_ps(s + r * k_block + i0 + 8, acc[r][1]);
    }
}

// o_r += sum_i p[r][i] v_i over keys i < n_keys for R rows, channels d0..d0 + 16.
template <int R>
MLLAMA_AVX2_TARGET void micro_values(query_state * const * rows, const float * p, const ggml_tensor * v, int64_t h,
                                     int64_t j0, int64_t n_keys, int64_t d0) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_loadu_ps(rows[r]->o + d0);
        acc[r][1] = _mm256_loadu_ps(rows[r]->o + d0 + 8);
    }
    const char * v0_row = reinterpret_cast<const char *>(row_of(v, h, j0) + d0);
    for (int64_t i = 0; i < n_keys; ++i) {
        const auto * vr = reinterpret_cast<const ggml_fp16_t *>(v0_row + i * v->nb[2]);
        const __m256 v0 = widen(vr), v1 = widen(vr + 8);
#pragma GCC unroll 5
        for (int r = 0; r < R; ++r) {
            const __m256 pr = _mm256_broadcast_ss(p + r * k_block + i);
            acc[r][0] = _mm256_fmadd_ps(pr, v0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(pr, v1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(rows[r]->o + d0, acc[r][0]);
        _mm256_storeu_ps(rows[r]->o + d0 + 8, acc[r][1]);
    }
}

// f(std::integral_constant<int, R>{}, r0) for the rows r0..r0 + R - 1 of n_rows: k_micro_rows at a time, the last
// step with the rest.
template <class F>
MLLAMA_AVX2_TARGET inline void over_rows(int64_t n_rows, F && f) {
    int64_t r0 = 0;
    for (; r0 + k_micro_rows <= n_rows; r0 += k_micro_rows) f(std::integral_constant<int, k_micro_rows>{}, r0);
    switch (n_rows - r0) {
    case 4: f(std::integral_constant<int, 4>{}, r0); break;
    case 3: f(std::integral_constant<int, 3>{}, r0); break;
    case 2: f(std::integral_constant<int, 2>{}, r0); break;
    case 1: f(std::integral_constant<int, 1>{}, r0); break;
    default: break;
    }
}

// Row st's online-softmax step over its block scores s (keys < n16, bias from the row's mask row mrow + j0; keys
// past n_keys hidden): new maximum, old sums rescaled, s turned into probabilities (0 for hidden keys).
MLLAMA_AVX2_TARGET void row_softmax(query_state & st, const ggml_fp16_t * mrow, int64_t n_keys, int64_t n16, int64_t D,
                                    float * s) {
    alignas(32) float bias[k_block];
    for (int64_t i = 0; i < n16; i += 8) {
        __m256 b = _mm256_set1_ps(k_neg_inf);
        if (i + 8 <= n_keys) {
            b = widen(mrow + i);
        } else {
            for (int64_t j = i; j < n_keys; ++j) bias[j] = _cvtsh_ss(mrow[j]);
            for (int64_t j = std::max(i, n_keys); j < i + 8; ++j) bias[j] = k_neg_inf;
            b = _mm256_load_ps(bias + i);
        }
        _mm256_store_ps(s + i, _mm256_add_ps(_mm256_load_ps(s + i), b));
    }
    __m256 mx = _mm256_set1_ps(k_neg_inf);
    for (int64_t i = 0; i < n16; i += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(s + i));
    const float m_new = std::max(st.m, simd::hmax256(mx));
    if (m_new == k_neg_inf) {  // no key seen yet: nothing to add
        std::fill(s, s + n16, 0.0f);
        return;
    }
    if (m_new != st.m) {
        const float alpha = std::exp(st.m - m_new);  // 0 on the first block with a live key
        for (int64_t d = 0; d < D; ++d) st.o[d] *= alpha;
        st.l *= alpha;
        st.m = m_new;
    }
    const __m256 m8 = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < n16; i += 8) {
        const __m256 e = simd::exp256(_mm256_sub_ps(_mm256_load_ps(s + i), m8));  // -inf -> exactly 0
        _mm256_store_ps(s + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    st.l += simd::hsum256(sum);
}

}  // namespace

MLLAMA_AVX2_TARGET void chunk_block_avx2(const ggml_tensor * dst, const shape & s, int64_t h,
                                         query_state * const * rows, const ggml_fp16_t * const * mrows, int64_t n_rows,
                                         int64_t j0, int64_t n, const bool * next_live) {
    const ggml_tensor * k = dst->src[1], * v = dst->src[2];
    const int64_t n16 = (n + 15) / 16 * 16;
    alignas(32) static thread_local float kt[k_xattn_max_head_dim * k_block];  // [k_block / 16][D][16]
    alignas(32) static thread_local float p[k_max_chunk_rows * k_block];  // [n_rows][k_block] scores, probabilities
    next_rows next{k, v, h, j0 + n, next_live ? std::clamp<int64_t>(s.n_kv - j0 - n, 0, k_block) : 0, next_live};
    widen_keys(k, h, j0, n, n16, s.D, kt);
    const int64_t per_step = (next.n + n16 / 16 - 1) / (n16 / 16);
    for (int64_t i0 = 0; i0 < n16; i0 += 16) {
        next.prefetch_until(next.done + per_step);  // the next block's rows, spread over the scores
        over_rows(n_rows, [&](auto R, int64_t r0) MLLAMA_AVX2_TARGET {
            micro_scores<decltype(R)::value>(rows + r0, kt + i0 * s.D, s.D, i0, p + r0 * k_block);
        });
    }
    for (int64_t r = 0; r < n_rows; ++r) row_softmax(*rows[r], mrows[r] + j0, n, n16, s.D, p + r * k_block);
    for (int64_t d0 = 0; d0 < s.D; d0 += 16) {
        over_rows(n_rows, [&](auto R, int64_t r0) MLLAMA_AVX2_TARGET {
            micro_values<decltype(R)::value>(rows + r0, p + r0 * k_block, v, h, j0, n, d0);
        });
    }
}

}  // namespace mllama::xattn

#endif  // MLLAMA_X86_KERNELS
