// The fused layer norm (csrc/kernels/x86/layer_norm.cpp: BF16 out on AVX-512, F32 out on the AVX2 family, which
// MLLAMA_AVX512=0 selects) against the exact ((x - mean) / sqrt(var + eps)) * w + b in double precision on the
// same inputs; built by tests/test_cpu_kernels.py with the kernels' sources.
//
//   layer_norm n N bias [threads]
//
// Inputs: x [n, N] F32 = 3 + N(0, 1), every 97th element x8 (a mean far from 0 and outliers); w = N(1, 0.5),
// b = N(0, 1) (bias 0: none), eps = 1e-5. The kernel sums in F32, so with u = 2^-24 and gamma_k = k u / (1 - k u):
// the mean is off by E_m <= gamma_n sum|x| / n + u |mean|; each x - mean by e_i <= E_m + u (|x_i - mean| + E_m);
// the variance by E_v <= [gamma_(n+1) sum (|x_i - mean| + e_i)^2 + sum (2 |x_i - mean| e_i + e_i^2)] / n + u var;
// 1 / sqrt(var + eps) relatively by d_s <= E_v / (2 (var + eps)) + 3u; the output by
// |w| (e_i s + |x_i - mean| s (d_s + u)) + u |t w| + u |y|, doubled as margin for the second-order terms; BF16
// output adds its rounding, 2^-8 of the value. Prints the largest error over that bound and the output type:
// "ratio=<r> type=<bf16|f32>". A missing bias, mean or weight is off by O(|y|), hundreds of times the bound.
#include "kernels/dispatch.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace mllama;

static double output_value(const ggml_tensor * y, int64_t r, int64_t i) {
    const char * row = static_cast<const char *>(y->data) + r * y->nb[1];
    if (y->type == GGML_TYPE_BF16) return ggml_bf16_to_fp32(reinterpret_cast<const ggml_bf16_t *>(row)[i]);
    return reinterpret_cast<const float *>(row)[i];
}

// The largest |y - exact| / bound over row r.
static double row_ratio(const ggml_tensor * y, int64_t r, const float * x, const float * w, const float * b,
                        int64_t n, float eps) {
    const double u = std::ldexp(1.0, -24), gamma_n = n * u / (1 - n * u), gamma_n1 = (n + 1) * u / (1 - (n + 1) * u);
    double sum = 0, sum_abs = 0;
    for (int64_t i = 0; i < n; ++i) sum += x[i], sum_abs += std::fabs(double(x[i]));
    const double mean = sum / n, e_mean = gamma_n * sum_abs / n + u * std::fabs(mean);
    double var = 0, var_sum = 0, var_extra = 0;
    for (int64_t i = 0; i < n; ++i) {
        const double d = std::fabs(x[i] - mean), e = e_mean + u * (d + e_mean);
        var += d * d, var_sum += (d + e) * (d + e), var_extra += 2 * d * e + e * e;
    }
    var /= n;
    const double e_var = (gamma_n1 * var_sum + var_extra) / n + u * var;
    const double s = 1 / std::sqrt(var + eps), d_s = e_var / (2 * (var + eps)) + 3 * u;
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
        const double d = x[i] - mean, e = e_mean + u * (std::fabs(d) + e_mean);
        const double exact = d * s * w[i] + (b ? b[i] : 0.0);
        double bound = 2 * (std::fabs(w[i]) * (e * s + std::fabs(d) * s * (d_s + u)) + u * std::fabs(d * s * w[i]) +
                            u * std::fabs(exact));
        if (y->type == GGML_TYPE_BF16) bound += std::ldexp(std::fabs(exact) + bound, -8);
        worst = std::max(worst, std::fabs(output_value(y, r, i) - exact) / std::max(bound, 1e-30));
    }
    return worst;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s n N bias [threads]\n", argv[0]);
        return 2;
    }
    const int64_t n = std::atoll(argv[1]), N = std::atoll(argv[2]);
    const bool bias = std::atoi(argv[3]) != 0;
    const int threads = argc > 4 ? std::atoi(argv[4]) : 2;
    if (kernel_family() == cpu_family::none) {
        std::printf("skip: no x86 kernel family on this CPU\n");
        return 0;
    }
    const float eps = 1e-5f;
    ggml_init_params params{static_cast<size_t>(16 * n * N + 64 * n) + (size_t(16) << 20), nullptr, false};
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, N);
    ggml_tensor * w = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
    ggml_tensor * b = bias ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n) : nullptr;
    std::mt19937_64 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto * xd = static_cast<float *>(x->data);
    for (int64_t i = 0; i < n * N; ++i) xd[i] = 3.0f + normal(rng) * (i % 97 == 0 ? 8.0f : 1.0f);
    for (int64_t i = 0; i < n; ++i) static_cast<float *>(w->data)[i] = 1.0f + 0.5f * normal(rng);
    if (b) for (int64_t i = 0; i < n; ++i) static_cast<float *>(b->data)[i] = normal(rng);
    ggml_tensor * y = layer_norm_for_linear(ctx, x, w, b, eps);  // [n, N]
    ggml_cgraph * graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    if (ggml_graph_compute_with_ctx(ctx, graph, threads) != GGML_STATUS_SUCCESS) return 1;
    double worst = 0;
    for (int64_t r = 0; r < N; ++r)
        worst = std::max(worst, row_ratio(y, r, xd + r * n, static_cast<const float *>(w->data),
                                          b ? static_cast<const float *>(b->data) : nullptr, n, eps));
    std::printf("ratio=%.4f type=%s\n", worst, y->type == GGML_TYPE_BF16 ? "bf16" : "f32");
    ggml_free(ctx);
    return 0;
}
