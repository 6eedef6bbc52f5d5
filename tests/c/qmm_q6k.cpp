// q6k_matmul (csrc/kernels/x86/qmm_q6k.cpp: AVX-512 VNNI; qmm_q6k_avx2.cpp: AVX2, or any CPU's under
// MLLAMA_AVX512=0) against ggml's own mul_mat on the same Q6_K weights and the same F32 rows, on ggml's
// CPU threads; built by tests/test_qmm_kernels.py and bench/qmm.py with the kernels' sources.
//
//   qmm_q6k K M N [threads] [reps]
//
// Weights: random bytes in every field of each block (every bit pattern of ql, qh and the int8
// scales) with a random fp16 d; x: random normal rows, the first block of the last row all zeros.
// Prints "nmse=<kernel vs ggml> max_abs=<...>", then with reps > 0 the median time of each over reps
// runs ("ggml_ms=... qmm_ms=... weight_bytes=..."), each run reading a different copy of the weights
// when one copy fits in a cache (at least 512 MB read per pass over the copies).
// QMM_COPIES=n times n copies of the weights (1: they stay in the caches, the arithmetic alone).
// QMM_Q6K_TILES=1 runs q6k_matmul_tiles (AMX tiles: kernels/x86/qmm_q6k_amx.cpp, emulated with
// MLLAMA_AMX_EMULATE=1) instead and, without reps, prints bound_ratio too (its error over its rounding bound: <= 1).
#include "kernels/dispatch.h"
#include "tile_bound.h"
#include "timing.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

using namespace mllama;

static ggml_tensor * random_q6k(ggml_context * ctx, int64_t K, int64_t M, std::mt19937_64 & rng) {
    ggml_tensor * w = ggml_new_tensor_2d(ctx, GGML_TYPE_Q6_K, K, M);  // [K, M]
    auto * bytes = static_cast<uint8_t *>(w->data);
    const size_t block = ggml_type_size(GGML_TYPE_Q6_K), n_blocks = ggml_nbytes(w) / block;
    std::uniform_real_distribution<float> scale(-1e-3f, 1e-3f);
    for (size_t i = 0; i < ggml_nbytes(w); i += 8) {
        const uint64_t r = rng();
        std::memcpy(bytes + i, &r, std::min<size_t>(8, ggml_nbytes(w) - i));
    }
    for (size_t b = 0; b < n_blocks; ++b) {  // d: the last 2 bytes of a block
        const ggml_fp16_t d = ggml_fp32_to_fp16(scale(rng));
        std::memcpy(bytes + b * block + block - sizeof(d), &d, sizeof(d));
    }
    return w;
}

int main(int argc, char ** argv) {
    product_args args;
    if (!parse_product_args(argc, argv, args)) return 2;
    const int64_t K = args.K, M = args.M, N = args.N;
    const int threads = args.threads, reps = args.reps;
    const bool tiles = std::getenv("QMM_Q6K_TILES") && std::strcmp(std::getenv("QMM_Q6K_TILES"), "1") == 0;
    if (tiles && !cpu_kernel_available(cpu_kernel::amx)) {
        std::printf("skip: no AMX tiles (hardware, or MLLAMA_AMX_EMULATE=1 on an AVX-512 BF16 CPU)\n");
        return 0;
    }
    if (!cpu_kernel_available(cpu_kernel::qmm)) {
        std::printf("skip: no form of the kernel for this CPU (AVX2 or AVX-512 VNNI)\n");
        return 0;
    }
    const size_t w_bytes = static_cast<size_t>(K / 256 * M) * ggml_type_size(GGML_TYPE_Q6_K);
    const char * copies_env = std::getenv("QMM_COPIES");
    const int copies = copies_env ? std::max(1, std::atoi(copies_env))
                       : reps > 0 ? static_cast<int>(std::max<size_t>(1, (size_t(512) << 20) / w_bytes + 1)) : 1;
    ggml_init_params params{copies * w_bytes + static_cast<size_t>(8 * K * N + 4 * M * N) * copies + (size_t(64) << 20),
                            nullptr, false};
    ggml_context * ctx = ggml_init(params);
    std::mt19937_64 rng(static_cast<uint64_t>(K * 1000003 + M * 31 + N));
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, N);  // [K, N]
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto * xd = static_cast<float *>(x->data);
    for (int64_t i = 0; i < K * N; ++i) xd[i] = normal(rng);
    std::fill(xd + (N - 1) * K, xd + (N - 1) * K + 256, 0.0f);
    paired_graphs graphs;
    for (int c = 0; c < copies; ++c) {
        ggml_tensor * w = random_q6k(ctx, K, M, rng);
        if (tiles ? !q6k_tiles_supported(w, x) : !q6k_matmul_supported(w, x)) {
            std::printf("unsupported shape\n");
            return 1;
        }
        ggml_tensor * ours = tiles ? q6k_matmul_tiles(ctx, w, x) : q6k_matmul(ctx, w, x);  // [M, N]
        graphs.add(ctx, ggml_mul_mat(ctx, w, x), ours);
    }
    ggml_graph_compute_with_ctx(ctx, graphs.ref.back(), threads);
    ggml_graph_compute_with_ctx(ctx, graphs.ours.back(), threads);
    const ggml_tensor * ref = graphs.ref_out, * ours = graphs.ours_out;
    double err = 0, norm = 0, max_abs = 0;
    for (int64_t i = 0; i < M * N; ++i) {
        const double a = static_cast<const float *>(ours->data)[i], b = static_cast<const float *>(ref->data)[i];
        err += (a - b) * (a - b), norm += b * b, max_abs = std::max(max_abs, std::fabs(a - b));
    }
    std::printf("nmse=%.3e max_abs=%.3e", norm > 0 ? err / norm : err, max_abs);
    if (tiles && reps == 0) std::printf(" bound_ratio=%.3e", bound_ratio(ref->src[0], x, ours));
    std::printf("\n");
    if (reps > 0) {
        const double ggml_ms = median_ms(ctx, graphs.ref, threads, reps), qmm_ms = median_ms(ctx, graphs.ours, threads, reps);
        std::printf("ggml_ms=%.4f qmm_ms=%.4f weight_bytes=%zu copies=%d\n", ggml_ms, qmm_ms, w_bytes, copies);
    }
    ggml_free(ctx);
    return 0;
}
