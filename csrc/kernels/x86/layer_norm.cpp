// The layer norm in front of the vision tower's BF16 GEMMs, in one pass over each row (see kernels/dispatch.h):
// ggml's norm, the weight's mul, the bias' add and the cast to the GEMM's input type are four passes over the
// [n_embd, n_tokens] activations, and ggml's norm sums in scalar doubles (7.6 ms per norm of a 4-tile image on
// Zen 4; the four took 0.83 s of the image, this pass 0.16 s: bench/README.md). Per row: the mean, then the
// variance of x - mean (two passes over the row, as ggml does, while it sits in L1), then ((x - mean) * inv_std) * w + b
// rounded as ggml rounds those three steps, stored as BF16 (AVX-512 family: what its GEMM multiplies) or
// F32 (AVX2 family). The sums are F32 in 16 or 8 lanes, ggml's in double: the results differ by the
// rounding of those sums (tests/c/layer_norm.cpp holds them to that bound).
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/simd_avx2.h"
#include "kernels/x86/simd_math.h"  // MLLAMA_AVX512_TARGET

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace mllama {
namespace {

// eps travels in the custom op's userdata pointer itself (its bits): nothing to keep alive with the graph.
void * eps_as_userdata(float eps) {
    uint32_t bits;
    std::memcpy(&bits, &eps, sizeof(bits));
    return reinterpret_cast<void *>(static_cast<uintptr_t>(bits));
}

float eps_of(const void * userdata) {
    const auto bits = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(userdata));
    float eps;
    std::memcpy(&eps, &bits, sizeof(eps));
    return eps;
}

// One row of the op: x -> y (the output row, BF16 or F32), with the weight w, the bias b (null: none) and eps.
struct norm_row {
    const float * x;
    void * y;
    const float * w, * b;
    int64_t n;
    float eps;
};

// dst->src = {x [n, N] F32, w [n] F32, b [n] F32 (optional)}; rows split across threads, each through row_fn.
template <void (*row_fn)(const norm_row &)>
void for_each_row(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * x = dst->src[0];
    const int64_t n_rows = x->ne[1], per = (n_rows + nth - 1) / nth;
    const int64_t r0 = std::min(n_rows, per * ith), r1 = std::min(n_rows, r0 + per);
    const auto * w = static_cast<const float *>(dst->src[1]->data);
    const auto * b = dst->src[2] ? static_cast<const float *>(dst->src[2]->data) : nullptr;
    const float eps = eps_of(userdata);
    for (int64_t r = r0; r < r1; ++r) {
        row_fn({reinterpret_cast<const float *>(static_cast<const char *>(x->data) + r * x->nb[1]),
                static_cast<char *>(dst->data) + r * dst->nb[1], w, b, x->ne[0], eps});
    }
}

// Lanes i..i+15 of a row of n that exist.
inline __mmask16 live_lanes(int64_t n, int64_t i) {
    return static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1u);
}

MLLAMA_AVX512_TARGET void layer_norm_bf16_row(const norm_row & a) {
    const float * x = a.x;
    auto * y = static_cast<uint16_t *>(a.y);
    const int64_t n32 = a.n / 32 * 32;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();  // two chains of sums
    for (int64_t i = 0; i < n32; i += 32) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + i + 16));
    }
    for (int64_t i = n32; i < a.n; i += 16) s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(live_lanes(a.n, i), x + i));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(a.n));
    s0 = s1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n32; i += 32) {
        const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), mean);
        const __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), mean);
        s0 = _mm512_fmadd_ps(d0, d0, s0);
        s1 = _mm512_fmadd_ps(d1, d1, s1);
    }
    for (int64_t i = n32; i < a.n; i += 16) {
        const __mmask16 live = live_lanes(a.n, i);
        const __m512 d = _mm512_maskz_sub_ps(live, _mm512_maskz_loadu_ps(live, x + i), mean);
        s0 = _mm512_fmadd_ps(d, d, s0);
    }
    const float variance = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(a.n);
    const __m512 inv_std = _mm512_set1_ps(1.0f / std::sqrt(variance + a.eps));
    for (int64_t i = 0; i < a.n; i += 16) {
        const __mmask16 live = live_lanes(a.n, i);
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), mean), inv_std);
        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(live, a.w + i));
        if (a.b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, a.b + i));
        _mm256_mask_storeu_epi16(y + i, live, (__m256i) _mm512_cvtneps_pbh(v));
    }
}

MLLAMA_AVX2_TARGET void layer_norm_f32_row(const norm_row & a) {
    const float * x = a.x;
    auto * y = static_cast<float *>(a.y);
    const int64_t n8 = a.n / 8 * 8;
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
    float sum = simd::hsum256(s);
    for (int64_t i = n8; i < a.n; ++i) sum += x[i];
    const float mean = sum / static_cast<float>(a.n);
    const __m256 m = _mm256_set1_ps(mean);
    s = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
        s = _mm256_fmadd_ps(d, d, s);
    }
    float squares = simd::hsum256(s);
    for (int64_t i = n8; i < a.n; ++i) squares += (x[i] - mean) * (x[i] - mean);
    const float inv_std = 1.0f / std::sqrt(squares / static_cast<float>(a.n) + a.eps);
    const __m256 is = _mm256_set1_ps(inv_std);
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), is), _mm256_loadu_ps(a.w + i));
        if (a.b) v = _mm256_add_ps(v, _mm256_loadu_ps(a.b + i));
        _mm256_storeu_ps(y + i, v);
    }
    for (int64_t i = n8; i < a.n; ++i) y[i] = (x[i] - mean) * inv_std * a.w[i] + (a.b ? a.b[i] : 0.0f);
}

ggml_tensor * layer_norm_op(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps,
                            ggml_type out_type, ggml_custom_op_t op) {
    ggml_tensor * args[] = {x, w, b};
    return ggml_custom_4d(ctx, out_type, x->ne[0], x->ne[1], 1, 1, args, b ? 3 : 2, op, GGML_N_TASKS_MAX,
                          eps_as_userdata(eps));  // [n, N]
}

}  // namespace

ggml_tensor * layer_norm_bf16_avx512(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    return layer_norm_op(ctx, x, w, b, eps, GGML_TYPE_BF16, for_each_row<layer_norm_bf16_row>);  // [n, N] BF16
}

ggml_tensor * layer_norm_f32_avx2(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    return layer_norm_op(ctx, x, w, b, eps, GGML_TYPE_F32, for_each_row<layer_norm_f32_row>);  // [n, N] F32
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
