// The AVX2 BF16 GEMM (csrc/kernels/x86/gemm_avx2.cpp) against ggml's own mul_mat + bias (+ GELU) on
// the same BF16 weights and F32 rows, on ggml's CPU threads; built by tests/test_avx2_kernels.py (and
// bench/gemm.py) with the kernel's sources alone. Runs on any CPU with AVX2, FMA and F16C.
//
//   gemm_avx2 K M N [threads] [reps]
//
// x is drawn BF16-exact, so ggml's conversion of x to BF16 changes nothing and both paths multiply the
// same values (a product of two BF16 values is exact in F32): they differ only in the order of their
// F32 additions, so any two results differ by at most 2 gamma_K sum_k |x_k w_k| per output (gamma_K =
// K u / (1 - K u), u = 2^-24, one rounding per addition), plus one rounding of the output for the bias
// added last. Through GELU (slope at most 1.13) the difference grows at most 1.13-fold, and the kernel's
// erf (max abs error 1.5e-7) and its float evaluation (a few roundings of values near 1) add at most
// 0.5 |y| (1.5e-7 + 16 u) for GELU's input y (5.6e-7 |y| / 2 measured at worst, near y = 0.05), and
// the output's own roundings 4 u |gelu(y)|. Prints the largest |ours - ggml|
// over that bound, without and with GELU: "avx2=<ratio> gelu=<ratio>", then with reps > 0 the median
// milliseconds and GFLOPS of each ("ggml_ms=... avx2_ms=... ggml_gflops=... avx2_gflops=...").
#include "kernels/dispatch.h"
#include "kernels/x86/entry_points.h"
#include "timing.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace mllama;

// The largest |ours - ref| / bound over the outputs (every token row up to 2e8 multiply-adds of
// checking, else evenly spaced rows: the bench's shapes).
// pre: ggml's outputs before GELU where ours and ref are after it (else null).
static double worst_ratio(const ggml_tensor * ours, const ggml_tensor * ref, const ggml_tensor * w, const ggml_tensor * x,
                          const ggml_tensor * pre) {
    const int64_t K = w->ne[0], M = w->ne[1], N = x->ne[1];
    const double u = std::ldexp(1.0, -24), gamma = K * u / (1 - K * u);
    const int64_t stride = std::max<int64_t>(1, static_cast<int64_t>(double(K) * M * N / 2e8));
    const auto * wv = static_cast<const ggml_bf16_t *>(w->data);
    const auto * xv = static_cast<const float *>(x->data);
    double worst = 0;
    for (int64_t n = 0; n < N; n += stride) {
        for (int64_t m = 0; m < M; ++m) {
            double abs_sum = 0;
            for (int64_t k = 0; k < K; ++k) abs_sum += std::fabs(double(xv[n * K + k]) * ggml_bf16_to_fp32(wv[m * K + k]));
            const double a = static_cast<const float *>(ours->data)[n * M + m];
            const double b = static_cast<const float *>(ref->data)[n * M + m];
            double bound = 2 * gamma * abs_sum + 2 * u * std::fabs(b);
            if (pre) {
                const double y = static_cast<const float *>(pre->data)[n * M + m];  // GELU's input
                bound = 1.13 * (2 * gamma * abs_sum + 2 * u * std::fabs(y)) + 0.5 * (1.5e-7 + 16 * u) * std::fabs(y) +
                        4 * u * std::fabs(b);
            }
            worst = std::max(worst, std::fabs(a - b) / (bound + 1e-30));
        }
    }
    return worst;
}

int main(int argc, char ** argv) {
    product_args args;
    if (!parse_product_args(argc, argv, args)) return 2;
    const int64_t K = args.K, M = args.M, N = args.N;
    const int threads = args.threads, reps = args.reps;
    if (!avx2_kernels_available()) {
        std::printf("skip: no AVX2 with FMA and F16C on this CPU\n");
        return 0;
    }
    // w, and its packed copy for each of the two products; x and its F32 view; five [M, N] outputs
    ggml_init_params params{static_cast<size_t>(6 * K * M + 12 * K * N + 24 * M * N + 4 * M) + (size_t(64) << 20),
                            nullptr, false};
    ggml_context * ctx = ggml_init(params);
    std::mt19937_64 rng(static_cast<uint64_t>(K * 1000003 + M * 31 + N));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    ggml_tensor * w = ggml_new_tensor_2d(ctx, GGML_TYPE_BF16, K, M);  // [K, M]
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, N);   // [K, N], BF16-exact values
    ggml_tensor * bias = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, M);   // [M]
    for (int64_t i = 0; i < K * M; ++i) static_cast<ggml_bf16_t *>(w->data)[i] = ggml_fp32_to_bf16(normal(rng) * 0.05f);
    for (int64_t i = 0; i < K * N; ++i) static_cast<float *>(x->data)[i] = ggml_bf16_to_fp32(ggml_fp32_to_bf16(normal(rng)));
    for (int64_t i = 0; i < M; ++i) static_cast<float *>(bias->data)[i] = normal(rng);
    if (!bf16_linear_supported(w)) {
        std::printf("unsupported shape\n");
        return 1;
    }
    ggml_tensor * ref = ggml_add(ctx, ggml_mul_mat(ctx, w, x), bias);  // [M, N]
    ggml_tensor * ref_gelu = ggml_gelu_erf(ctx, ref);                  // [M, N]
    ggml_tensor * avx2 = bf16_linear_avx2(ctx, w, x, bias, /*gelu=*/false);
    ggml_tensor * avx2_gelu = bf16_linear_avx2(ctx, w, x, bias, /*gelu=*/true);
    ggml_cgraph * graphs[3] = {ggml_new_graph(ctx), ggml_new_graph(ctx), ggml_new_graph(ctx)};
    ggml_build_forward_expand(graphs[0], ref_gelu);
    ggml_build_forward_expand(graphs[1], avx2);
    ggml_build_forward_expand(graphs[2], avx2_gelu);
    for (ggml_cgraph * g : graphs) ggml_graph_compute_with_ctx(ctx, g, threads);
    std::printf("avx2=%.4f gelu=%.4f\n", worst_ratio(avx2, ref, w, x, nullptr), worst_ratio(avx2_gelu, ref_gelu, w, x, ref));
    if (reps > 0) {
        ggml_cgraph * product = ggml_new_graph(ctx);  // ggml's product + bias alone
        ggml_build_forward_expand(product, ref);
        const double ggml_ms = median_ms(ctx, {product}, threads, reps), avx2_ms = median_ms(ctx, {graphs[1]}, threads, reps);
        const double gflop = 2.0 * K * M * N / 1e9;
        std::printf("ggml_ms=%.3f avx2_ms=%.3f ggml_gflops=%.1f avx2_gflops=%.1f\n", ggml_ms, avx2_ms,
                    gflop / ggml_ms * 1e3, gflop / avx2_ms * 1e3);
    }
    ggml_free(ctx);
    return 0;
}
