// q4k_matmul (csrc/kernels/x86/qmm_q4k_avx512.cpp or qmm_q4k_avx2.cpp, the form of this CPU's family) against
// ggml's own mul_mat on the same Q4_K weights in ggml's CPU_REPACK buffer (repacked by ggml as the model
// loader has it) and the same F32 rows, on ggml's CPU threads; built by tests/test_qmm_kernels.py and
// bench/qmm.py with the kernels' sources. MLLAMA_AVX512=0 runs the AVX2 form on an AVX-512 CPU.
//
//   qmm_q4k K M N [threads] [reps]
//
// QMM_Q4K_TILES=1 runs q4k_matmul_tiles (AMX tiles: kernels/x86/qmm_q4k_amx.cpp, emulated with
// MLLAMA_AMX_EMULATE=1) instead and, without reps, prints bound_ratio too (its error over its rounding bound: <= 1);
// QMM_COPIES=n times n copies of the weights (1: they stay in the caches, the arithmetic alone).
//
// Prints "form=avx512|avx2" first. Weights: random bytes in every field of each block (every bit pattern of
// the quants and of the packed 6-bit scales and mins) with random fp16 d and dmin; x: random normal rows,
// the first block of the last row all zeros. Prints "nmse=<kernel vs ggml> max_abs=<...> plain_nmse=<ggml
// repacked vs ggml on the file layout>", then with reps > 0 the median time of each over reps runs
// ("ggml_ms=... qmm_ms=... weight_bytes=..."), each run reading a different copy of the weights when one
// copy fits in a cache.
#include "kernels/dispatch.h"
#include "tile_bound.h"
#include "timing.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
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

static ggml_backend_buffer_type_t repack_buffer_type() {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_t cpu = ggml_backend_reg_dev_get(reg, 0);
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
    for (ggml_backend_buffer_type_t * b = get_extra ? get_extra(cpu) : nullptr; b && *b; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    }
    return nullptr;
}

static std::vector<uint8_t> random_q4k(int64_t K, int64_t M, std::mt19937_64 & rng) {
    const size_t block = ggml_type_size(GGML_TYPE_Q4_K), n_blocks = static_cast<size_t>(K / 256 * M);
    std::vector<uint8_t> bytes(block * n_blocks);
    for (size_t i = 0; i < bytes.size(); i += 8) {
        const uint64_t r = rng();
        std::memcpy(bytes.data() + i, &r, std::min<size_t>(8, bytes.size() - i));
    }
    std::uniform_real_distribution<float> scale(-1e-3f, 1e-3f);
    for (size_t b = 0; b < n_blocks; ++b) {  // d, dmin: the first 4 bytes of a block
        const ggml_fp16_t d[2] = {ggml_fp32_to_fp16(scale(rng)), ggml_fp32_to_fp16(scale(rng))};
        std::memcpy(bytes.data() + b * block, d, sizeof(d));
    }
    return bytes;
}

static double nmse_of(const ggml_tensor * a, const ggml_tensor * b, double * max_abs) {
    double err = 0, norm = 0;
    for (int64_t i = 0; i < ggml_nelements(a); ++i) {
        const double x = static_cast<const float *>(a->data)[i], y = static_cast<const float *>(b->data)[i];
        err += (x - y) * (x - y), norm += y * y;
        if (max_abs) *max_abs = std::max(*max_abs, std::fabs(x - y));
    }
    return norm > 0 ? err / norm : err;
}

int main(int argc, char ** argv) {
    product_args args;
    if (!parse_product_args(argc, argv, args)) return 2;
    const int64_t K = args.K, M = args.M, N = args.N;
    const int threads = args.threads, reps = args.reps;
    ggml_backend_buffer_type_t repack = repack_buffer_type();
    const bool tiles = std::getenv("QMM_Q4K_TILES") && std::strcmp(std::getenv("QMM_Q4K_TILES"), "1") == 0;
    if (tiles && !cpu_kernel_available(cpu_kernel::amx)) {
        std::printf("skip: no AMX tiles (hardware, or MLLAMA_AMX_EMULATE=1 on an AVX-512 BF16 CPU)\n");
        return 0;
    }
    if (!cpu_kernel_available(cpu_kernel::qmm) || !repack) {
        std::printf("skip: no qmm kernel on this CPU (AVX2, or AVX-512 with VNNI) or no CPU_REPACK buffer\n");
        return 0;
    }
    std::printf("form=%s\n", kernel_family() == cpu_family::avx2 ? "avx2" : "avx512");
    const size_t w_bytes = static_cast<size_t>(K / 256 * M) * ggml_type_size(GGML_TYPE_Q4_K);
    const char * copies_env = std::getenv("QMM_COPIES");
    const int copies = copies_env ? std::max(1, std::atoi(copies_env))
                       : reps > 0 ? static_cast<int>(std::max<size_t>(1, (size_t(512) << 20) / w_bytes + 1)) : 1;
    std::mt19937_64 rng(static_cast<uint64_t>(K * 1000003 + M * 31 + N));
    ggml_context * weights = ggml_init({ggml_tensor_overhead() * (copies + 1), nullptr, true});
    const size_t ctx_bytes = w_bytes + static_cast<size_t>(8 * K * N + 16 * M * N) * copies + (size_t(64) << 20);
    ggml_context * ctx = ggml_init({ctx_bytes, nullptr, false});
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, N);  // [K, N]
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto * xd = static_cast<float *>(x->data);
    for (int64_t i = 0; i < K * N; ++i) xd[i] = normal(rng);
    std::fill(xd + (N - 1) * K, xd + (N - 1) * K + 256, 0.0f);
    std::vector<ggml_tensor *> ws;
    for (int c = 0; c < copies; ++c) ws.push_back(ggml_new_tensor_2d(weights, GGML_TYPE_Q4_K, K, M));  // [K, M]
    ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors_from_buft(weights, repack);
    ggml_tensor * plain = ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_K, K, M);  // [K, M], the file layout
    for (int c = 0; c < copies; ++c) {
        const std::vector<uint8_t> bytes = random_q4k(K, M, rng);
        ggml_backend_tensor_set(ws[c], bytes.data(), 0, bytes.size());  // ggml repacks here
        if (c == copies - 1) std::memcpy(plain->data, bytes.data(), bytes.size());
    }
    paired_graphs graphs;
    for (ggml_tensor * w : ws) {
        if (tiles ? !q4k_tiles_supported(w, x) : !q4k_matmul_supported(w, x)) {
            std::printf("unsupported shape\n");
            return 1;
        }
        ggml_tensor * ours = tiles ? q4k_matmul_tiles(ctx, w, x) : q4k_matmul(ctx, w, x);  // [M, N]
        graphs.add(ctx, ggml_mul_mat(ctx, w, x), ours);
    }
    ggml_tensor * unpacked = ggml_mul_mat(ctx, plain, x);  // [M, N]
    ggml_cgraph * plain_graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(plain_graph, unpacked);
    ggml_graph_compute_with_ctx(ctx, graphs.ref.back(), threads);
    ggml_graph_compute_with_ctx(ctx, graphs.ours.back(), threads);
    ggml_graph_compute_with_ctx(ctx, plain_graph, threads);
    double max_abs = 0;
    const double nmse = nmse_of(graphs.ours_out, graphs.ref_out, &max_abs);
    const double plain_nmse = nmse_of(graphs.ref_out, unpacked, nullptr);
    std::printf("nmse=%.3e max_abs=%.3e plain_nmse=%.3e", nmse, max_abs, plain_nmse);
    if (tiles && reps == 0) std::printf(" bound_ratio=%.3e", bound_ratio(plain, x, graphs.ours_out));  // O(K M N)
    std::printf("\n");
    if (reps > 0) {
        const double ggml_ms = median_ms(ctx, graphs.ref, threads, reps), qmm_ms = median_ms(ctx, graphs.ours, threads, reps);
        std::printf("ggml_ms=%.4f qmm_ms=%.4f weight_bytes=%zu copies=%d\n", ggml_ms, qmm_ms, w_bytes, copies);
    }
    ggml_backend_buffer_free(buffer);
    ggml_free(ctx);
    ggml_free(weights);
    return 0;
}
