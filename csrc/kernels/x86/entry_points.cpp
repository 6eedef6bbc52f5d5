// The entry points of kernels/dispatch.h for the kernels with forms for several CPU families: each
// picks its form by kernel_family() (dispatch.cpp says which family runs here).
#include "kernels/x86/entry_points.h"

#include "kernels/dispatch.h"
#include "kernels/x86/q4k_block.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

namespace mllama {

ggml_tensor * bf16_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                             ggml_tensor * mask_rows, bool tiles) {
    if (kernel_family() == cpu_family::avx2) return attention_avx2(ctx, q, k, v, mask, mask_rows);  // [D * H, N]
    return bf16_attention_avx512(ctx, q, k, v, mask, mask_rows, tiles);
}

ggml_tensor * bf16_linear(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias, bool gelu, bool bf16_out,
                          bool tiles) {
    if (kernel_family() == cpu_family::avx2) return bf16_linear_avx2(ctx, w, x, bias, gelu);  // [M, N] F32
    return bf16_linear_avx512(ctx, w, x, bias, gelu, bf16_out, tiles);
}

bool bf16_linear_takes_f32() { return kernel_family() == cpu_family::avx2; }

ggml_tensor * layer_norm_for_linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    if (kernel_family() == cpu_family::avx2) return layer_norm_f32_avx2(ctx, x, w, b, eps);  // [n, N] F32
    return layer_norm_bf16_avx512(ctx, x, w, b, eps);                                         // [n, N] BF16
}

ggml_tensor * gelu_erf_fast(ggml_context * ctx, ggml_tensor * x) {
    return kernel_family() == cpu_family::avx2 ? gelu_erf_avx2(ctx, x) : gelu_erf_avx512(ctx, x);
}

ggml_tensor * q6k_matmul(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return kernel_family() == cpu_family::avx2 ? q6k_matmul_avx2(ctx, w, x) : q6k_matmul_avx512(ctx, w, x);  // [M, N]
}

int64_t q4k_max_rows() { return kernel_family() == cpu_family::avx2 ? k_qmm_max_rows : k_q4k_max_rows; }

bool q4k_matmul_supported(const ggml_tensor * w, const ggml_tensor * x) {
    return cpu_kernel_available(cpu_kernel::qmm) && q4k::layout_supported(w, x);
}

ggml_tensor * q4k_matmul(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return kernel_family() == cpu_family::avx2 ? q4k_matmul_avx2(ctx, w, x) : q4k_matmul_avx512(ctx, w, x);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
