// The x86 kernels' forms per CPU family, behind the entry points of kernels/dispatch.h
// (kernels/x86/entry_points.cpp picks one by kernel_family()): declared for those entry points and the
// kernels' test drivers only.
#pragma once

struct ggml_context;
struct ggml_tensor;

namespace mllama {

// bf16_linear on AVX-512 BF16 dot products or AMX tiles (kernels/x86/gemm_bf16.cpp, gemm_amx.cpp).
ggml_tensor * bf16_linear_avx512(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias, bool gelu,
                                 bool bf16_out, bool tiles);

// bf16_linear on AVX2 FMA (kernels/x86/gemm_avx2.cpp): x in F32 (converted once where it is not), F32 out.
ggml_tensor * bf16_linear_avx2(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias, bool gelu);

// The vision attention (kernels/dispatch.h's bf16_attention) on AVX-512 BF16 dot products or AMX tiles
// (kernels/x86/attn_bf16.cpp, attn_amx.cpp), and on AVX2 FMA (kernels/x86/attn_avx2.cpp: F32 Q and
// probabilities, K and V rounded to BF16).
ggml_tensor * bf16_attention_avx512(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                                    ggml_tensor * mask_rows, bool tiles);
ggml_tensor * attention_avx2(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                             ggml_tensor * mask_rows);

// layer_norm_for_linear in one pass per row, BF16 out on AVX-512, F32 out on AVX2 (kernels/x86/layer_norm.cpp).
ggml_tensor * layer_norm_bf16_avx512(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps);
ggml_tensor * layer_norm_f32_avx2(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps);

// The exact GELU, 16 or 8 floats at a time (kernels/x86/gelu.cpp).
ggml_tensor * gelu_erf_avx512(ggml_context * ctx, ggml_tensor * x);
ggml_tensor * gelu_erf_avx2(ggml_context * ctx, ggml_tensor * x);

// q6k_matmul on AVX-512 VNNI dot products (kernels/x86/qmm_q6k.cpp) and on AVX2 (kernels/x86/qmm_q6k_avx2.cpp).
ggml_tensor * q6k_matmul_avx512(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);
ggml_tensor * q6k_matmul_avx2(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// q4k_matmul on AVX-512 VNNI (kernels/x86/qmm_q4k_avx512.cpp) and on AVX2 (kernels/x86/qmm_q4k_avx2.cpp).
ggml_tensor * q4k_matmul_avx512(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);
ggml_tensor * q4k_matmul_avx2(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

}  // namespace mllama
