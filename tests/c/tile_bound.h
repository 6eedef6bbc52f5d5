// What the tile products' drivers (tests/c/qmm_q4k.cpp, qmm_q6k.cpp) check their results against.
#pragma once

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <vector>

// The tile paths' error bound (kernels/x86/qmm_q4k_amx.cpp, qmm_q6k_amx.cpp): each term w x carries two BF16
// roundings, so |ours - exact| <= 2^-8 sum_k |w x| (+ F32 summation, K 2^-24 of the same sum). The largest ratio of
// the error to that bound over all outputs; exact: W decoded by ggml (plain: the file layout) times x in double.
inline double bound_ratio(const ggml_tensor * plain, const ggml_tensor * x, const ggml_tensor * ours) {
    const int64_t K = plain->ne[0], M = plain->ne[1], N = x->ne[1];
    std::vector<float> w(static_cast<size_t>(K));
    double worst = 0;
    for (int64_t m = 0; m < M; ++m) {
        const char * row = static_cast<const char *>(plain->data) + m * plain->nb[1];
        ggml_get_type_traits(plain->type)->to_float(row, w.data(), K);
        for (int64_t n = 0; n < N; ++n) {
            const float * xr = static_cast<const float *>(x->data) + n * K;
            double exact = 0, magnitude = 0;
            for (int64_t k = 0; k < K; ++k) exact += double(w[k]) * xr[k], magnitude += std::fabs(double(w[k]) * xr[k]);
            const double got = static_cast<const float *>(ours->data)[n * M + m];
            const double bound = (std::ldexp(1.0, -8) + K * std::ldexp(1.0, -24)) * magnitude + 1e-30;
            worst = std::max(worst, std::fabs(got - exact) / bound);
        }
    }
    return worst;
}

