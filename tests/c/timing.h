// Shared by the kernels' test drivers (tests/c/*.cpp; timed by bench/gemm.py and bench/qmm.py): the
// product drivers' arguments, their paired graphs (ggml's op and ours), and timing.
#pragma once

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

// "K M N [threads] [reps]": a product of [K, M] weights with N rows; false (usage printed) when short.
struct product_args {
    int64_t K = 0, M = 0, N = 0;
    int threads = 2, reps = 0;
};

inline bool parse_product_args(int argc, char ** argv, product_args & a) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s K M N [threads] [reps]\n", argv[0]);
        return false;
    }
    a.K = std::atoll(argv[1]), a.M = std::atoll(argv[2]), a.N = std::atoll(argv[3]);
    a.threads = argc > 4 ? std::atoi(argv[4]) : 2, a.reps = argc > 5 ? std::atoi(argv[5]) : 0;
    return true;
}

// One graph per weight copy for ggml's product and for ours; the last outputs are kept for the checks.
struct paired_graphs {
    std::vector<ggml_cgraph *> ref, ours;
    ggml_tensor * ref_out = nullptr, * ours_out = nullptr;

    void add(ggml_context * ctx, ggml_tensor * ref_product, ggml_tensor * our_product) {
        ref.push_back(ggml_new_graph(ctx));
        ours.push_back(ggml_new_graph(ctx));
        ggml_build_forward_expand(ref.back(), ref_out = ref_product);
        ggml_build_forward_expand(ours.back(), ours_out = our_product);
    }
};

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
