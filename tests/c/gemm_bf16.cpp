// The BF16 GEMM (csrc/kernels/x86/gemm_bf16.cpp: AVX-512 BF16; gemm_amx.cpp: AMX tiles, emulated
// under MLLAMA_AMX_EMULATE=1) against ggml's own mul_mat + bias on the same BF16 weights and F32
// rows, on ggml's CPU threads; built by tests/test_cpu_kernels.py with the kernels' sources alone.
//
//   gemm_bf16 K M N [threads] [reps]
//
// Every path multiplies the same BF16 values (x rounded to BF16 once, as ggml does; products of two
// BF16 values are exact in F32) and differs only in the order of its F32 additions, so any two
// results differ by at most 2 gamma_K sum_k |x_k w_k| per output (gamma_K = K u / (1 - K u),
// u = 2^-24, one rounding per addition, bias added last). Prints, for the AVX-512 path and the tile
// path ("tiles" only where they can run here), the largest |ours - ggml| over that bound:
// "avx512=<ratio> tiles=<ratio|none>", then with reps > 0 the median milliseconds of each
// ("ggml_ms=... avx512_ms=... tiles_ms=...") and their GFLOPS.
#include "kernels/dispatch.h"
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

static float bf16_value(const ggml_tensor * t, int64_t i) {
    return ggml_bf16_to_fp32(static_cast<const ggml_bf16_t *>(t->data)[i]);
}

// The largest |ours - ref| / (2 gamma_K sum_k |x_k w_k| + one rounding of the output) over the outputs
// (every token row up to 2e8 multiply-adds of checking, else evenly spaced rows: the bench's shapes).
static double worst_ratio(const ggml_tensor * ours, const ggml_tensor * ref, const ggml_tensor * w,
                          const std::vector<float> & x_bf16, int64_t K, int64_t M, int64_t N) {
    const double u = std::ldexp(1.0, -24), gamma = K * u / (1 - K * u);
    const int64_t stride = std::max<int64_t>(1, static_cast<int64_t>(double(K) * M * N / 2e8));
    double worst = 0;
    for (int64_t n = 0; n < N; n += stride) {
        for (int64_t m = 0; m < M; ++m) {
            double abs_sum = 0;
            for (int64_t k = 0; k < K; ++k) abs_sum += std::fabs(double(x_bf16[n * K + k]) * bf16_value(w, m * K + k));
            const double a = static_cast<const float *>(ours->data)[n * M + m];
            const double b = static_cast<const float *>(ref->data)[n * M + m];
            const double bound = 2 * gamma * abs_sum + 2 * u * std::fabs(b) + 1e-30;
            worst = std::max(worst, std::fabs(a - b) / bound);
        }
    }
    return worst;
}

int main(int argc, char ** argv) {
    product_args args;
    if (!parse_product_args(argc, argv, args)) return 2;
    const int64_t K = args.K, M = args.M, N = args.N;
    const int threads = args.threads, reps = args.reps;
    if (!cpu_kernels_available()) {
        std::printf("skip: no AVX-512 BF16 on this CPU\n");
        return 0;
    }
    ggml_init_params params{static_cast<size_t>(2 * K * M + 20 * K * N + 16 * M * N + 4 * M) + (size_t(64) << 20), nullptr,
                            false};
    ggml_context * ctx = ggml_init(params);
    std::mt19937_64 rng(static_cast<uint64_t>(K * 1000003 + M * 31 + N));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    ggml_tensor * w = ggml_new_tensor_2d(ctx, GGML_TYPE_BF16, K, M);  // [K, M]
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, N);   // [K, N]
    ggml_tensor * bias = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, M);   // [M]
    for (int64_t i = 0; i < K * M; ++i) static_cast<ggml_bf16_t *>(w->data)[i] = ggml_fp32_to_bf16(normal(rng) * 0.05f);
    std::vector<float> x_bf16(static_cast<size_t>(K * N));
    for (int64_t i = 0; i < K * N; ++i) {
        static_cast<float *>(x->data)[i] = normal(rng);
        x_bf16[i] = ggml_bf16_to_fp32(ggml_fp32_to_bf16(static_cast<float *>(x->data)[i]));
    }
    for (int64_t i = 0; i < M; ++i) static_cast<float *>(bias->data)[i] = normal(rng);
    if (!bf16_linear_supported(w)) {
        std::printf("unsupported shape\n");
        return 1;
    }
    ggml_tensor * ref = ggml_add(ctx, ggml_mul_mat(ctx, w, x), bias);  // [M, N]
    ggml_tensor * avx = bf16_linear(ctx, w, x, bias, false, false, /*tiles=*/false);
    const bool tiles_run = amx_tiles_available() && K % 32 == 0;
    ggml_tensor * tiles = bf16_linear(ctx, w, x, bias, false, false, /*tiles=*/true);
    ggml_cgraph * graphs[3] = {ggml_new_graph(ctx), ggml_new_graph(ctx), ggml_new_graph(ctx)};
    ggml_tensor * outs[3] = {ref, avx, tiles};
    for (int i = 0; i < 3; ++i) {
        ggml_build_forward_expand(graphs[i], outs[i]);
        ggml_graph_compute_with_ctx(ctx, graphs[i], threads);
    }
    std::printf("avx512=%.4f ", worst_ratio(avx, ref, w, x_bf16, K, M, N));
    if (tiles_run) std::printf("tiles=%.4f\n", worst_ratio(tiles, ref, w, x_bf16, K, M, N));
    else std::printf("tiles=none\n");
    if (reps > 0) {
        double ms[3];
        for (int i = 0; i < 3; ++i) ms[i] = median_ms(ctx, {graphs[i]}, threads, reps);
        const double gflop = 2.0 * K * M * N / 1e9;
        std::printf("ggml_ms=%.3f avx512_ms=%.3f tiles_ms=%.3f ggml_gflops=%.1f avx512_gflops=%.1f tiles_gflops=%.1f\n",
                    ms[0], ms[1], ms[2], gflop / ms[0] * 1e3, gflop / ms[1] * 1e3, gflop / ms[2] * 1e3);
    }
    ggml_free(ctx);
    return 0;
}
