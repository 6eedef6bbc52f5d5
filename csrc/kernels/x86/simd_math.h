// AVX-512 helpers shared by the CPU kernels (attention, GELU, packing transposes). Every function here needs the
// "avx512f" target: call them only from functions compiled with MLLAMA_AVX512_TARGET (transpose4_in_lanes: any
// target with avx512f, such as the VNNI kernels').
#pragma once

#if !(defined(__x86_64__) || defined(_M_X64))
#error "kernels/x86/simd_math.h is for x86-64 builds only"
#endif

#include <immintrin.h>

#define MLLAMA_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

namespace mllama::simd {

// e^x for 16 floats, relative error ~2e-7 on [-87, 88]; lanes below -87 give exactly 0 (so -inf -> 0).
MLLAMA_AVX512_TARGET static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n ln2, ln2 split in two parts (Cody-Waite) so r keeps its precision
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    // e^r on [-ln2/2, ln2/2]: Taylor to degree 7 (truncation error 1e-8)
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}

// 0.5 x (1 + erf(x / sqrt(2))) for 16 floats; erf by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7).
MLLAMA_AVX512_TARGET static inline __m512 gelu512(__m512 x) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));  // |x| / sqrt(2)
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 poly = _mm512_set1_ps(1.061405429f);
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z));  // e^(-z^2)
    const __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));                   // erf(|x| / sqrt(2))
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 erf = _mm512_mask_sub_ps(erf_abs, negative, _mm512_setzero_ps(), erf_abs);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

// The first half of a 16 x 16 transpose of 32-bit elements, rows 4k..4k + 3 of it (in): within each 128-bit lane, a
// 4 x 4 transpose, out[c] lane L = column 4L + c of the four rows (an unpack of dwords, one of qwords). Only the
// "avx512f" target, so that every AVX-512 kernel (the VNNI ones too) inlines it.
__attribute__((target("avx512f"))) static inline void transpose4_in_lanes(const __m512i in[4], __m512i out[4]) {
    const __m512i a0 = _mm512_unpacklo_epi32(in[0], in[1]), a1 = _mm512_unpackhi_epi32(in[0], in[1]);
    const __m512i a2 = _mm512_unpacklo_epi32(in[2], in[3]), a3 = _mm512_unpackhi_epi32(in[2], in[3]);
    out[0] = _mm512_unpacklo_epi64(a0, a2);
    out[1] = _mm512_unpackhi_epi64(a0, a2);
    out[2] = _mm512_unpacklo_epi64(a1, a3);
    out[3] = _mm512_unpackhi_epi64(a1, a3);
}

// The second half: b[4k..4k + 3] = transpose4_in_lanes of rows 4k..4k + 3 -> out[j] lane i = row i's element j (two
// shuffles of 128-bit lanes: column 4L + c gathers lane L of b[c], b[4 + c], b[8 + c], b[12 + c]).
MLLAMA_AVX512_TARGET static inline void lanes_to_columns(const __m512i b[16], __m512i out[16]) {
    for (int c = 0; c < 4; ++c) {
        const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        const __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        out[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        out[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        out[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        out[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

// The 16 x 16 transpose of 32-bit elements: out[j] lane i = in[i] lane j.
MLLAMA_AVX512_TARGET static inline void transpose16(const __m512i in[16], __m512i out[16]) {
    __m512i b[16];
    for (int k = 0; k < 4; ++k) transpose4_in_lanes(in + 4 * k, b + 4 * k);
    lanes_to_columns(b, out);
}

}  // namespace mllama::simd
