// Timing shared by the kernels' test drivers (tests/c/*.cpp), for bench/gemm.py and bench/qmm.py.
#pragma once

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <vector>

// Median milliseconds of reps computations, rotating through the graphs (copies of the same product on
// different weights, so that each run reads them from memory; one graph: the same one every time).
inline double median_ms(ggml_context * ctx, const std::vector<ggml_cgraph *> & graphs, int threads, int reps) {
    std::vector<double> ms;
    for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        ggml_graph_compute_with_ctx(ctx, graphs[static_cast<size_t>(r) % graphs.size()], threads);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}
