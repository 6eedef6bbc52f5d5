// Exact-form GELU, 0.5 x (1 + erf(x / sqrt(2))), vectorized for AVX-512 and for AVX2 (see kernels/dispatch.h).
// erf by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7, the size of a float rounding step
// near 1); ggml's gelu_erf calls the scalar erff per element (figures in bench/README.md).
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/simd_avx2.h"
#include "kernels/x86/simd_math.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace mllama {
namespace {

// Thread ith's elements of n: 16-aligned ranges, the last thread takes the rest.
std::pair<int64_t, int64_t> thread_range(int64_t n, int ith, int nth) {
    const int64_t per = (n / nth + 15) / 16 * 16;
    const int64_t i0 = std::min(n, per * ith);
    return {i0, ith == nth - 1 ? n : std::min(n, i0 + per)};
}

// dst = gelu(a), contiguous F32, split across threads by thread_range.
MLLAMA_AVX512_TARGET void gelu_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void *) {
    const auto [i0, i1] = thread_range(ggml_nelements(a), ith, nth);
    const auto * x = static_cast<const float *>(a->data);
    auto * y = static_cast<float *>(dst->data);
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) _mm512_storeu_ps(y + i, simd::gelu512(_mm512_loadu_ps(x + i)));
    if (i < i1) {
        const __mmask16 live = static_cast<__mmask16>((1u << (i1 - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, live, simd::gelu512(_mm512_maskz_loadu_ps(live, x + i)));
    }
}

// The same with 8 floats at a time; the last partial vector through a copy.
MLLAMA_AVX2_TARGET void gelu_op_avx2(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void *) {
    const auto [i0, i1] = thread_range(ggml_nelements(a), ith, nth);
    const auto * x = static_cast<const float *>(a->data);
    auto * y = static_cast<float *>(dst->data);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(y + i, simd::gelu256(_mm256_loadu_ps(x + i)));
    if (i < i1) {
        float tail[8] = {};
        std::copy(x + i, x + i1, tail);
        _mm256_storeu_ps(tail, simd::gelu256(_mm256_loadu_ps(tail)));
        std::copy(tail, tail + (i1 - i), y + i);
    }
}

}  // namespace

ggml_tensor * gelu_erf_avx512(ggml_context * ctx, ggml_tensor * x) {
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    return ggml_map_custom1(ctx, x, gelu_op, GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // same shape as x
}

ggml_tensor * gelu_erf_avx2(ggml_context * ctx, ggml_tensor * x) {
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    return ggml_map_custom1(ctx, x, gelu_op_avx2, GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // same shape as x
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
