// The vision attention kernel (csrc/kernels/x86/attn_bf16.cpp: AVX-512 BF16; attn_amx.cpp: AMX
// tiles, emulated under MLLAMA_AMX_EMULATE=1) against softmax(Q K^T / sqrt(D) + mask) V in double
// precision on the same BF16 inputs; built by tests/test_cpu_kernels.py with the kernels' sources.
//
//   attn_bf16 D H N [threads] [reps]
//
// With reps > 0 it times each path instead (median milliseconds of reps runs, the packing of K and V
// included, and GFLOPS of the two products: 4 D N^2 H), without the check (whose reference is slow at
// the tower's sizes): "avx512_ms=... tiles_ms=... avx2_ms=..." (bench/amx_sweep.sh; ATTN_ONLY=tiles, avx512 or
// avx2: that path alone, the others "none"); built with
// -DMLLAMA_AMX_ATTN_PHASES, also the tile path's time stamp ticks per phase of its steps, as shares.
// Inputs: q, k, v [D, H, N] random normal (some keys larger, below), rounded as the kernel rounds them
// (q scaled by log2(e) / sqrt(D) first: the BF16 paths' scores are in base 2, turned back with ln 2
// here); mask [N, N]: every third query row has -inf at every fifth key, the last row is all -inf (its
// output must be zeros), the others are zeros. ATTN_MASK=pad: the vision tower's mask instead (padding x padding
// pairs -inf; here the rows and keys from N / 3 on and every 37th are padding), whose key blocks past the first
// third the attention skips for rows that are all padding (kernels/x86/attn_mask.h; ATTN_MASK=tower: the 4-tile
// image's own, the last 7 rows of every 1608 padding, for timing the tower's case): each path also runs
// without that skip (mask rows with no hidden block) and must give the same outputs bit for bit. Per output the
// kernel's error is bounded by its roundings: each probability enters P V rounded to BF16 (2^-9 relative) while the
// softmax sum uses it unrounded (2^-9), 2^x to 2.7e-6, scores in F32: |o - o_ref| <= 2^-8 sum_j p_j |v_j| / sum_j p_j,
// doubled for margin. The AVX2 path (attn_avx2.cpp) keeps Q and the probabilities in F32: against the reference on
// unrounded q its error comes from the F32 scores (at most gamma_D max_j sum_d |q_d k_jd| each, so each probability
// moves by twice that relatively), e^x (2e-7) and the F32 sums of P V and of the probabilities (gamma_N each):
// |o - o_ref| <= (2 gamma_D S + 4e-7 + 2 gamma_N) sum_j p_j |v_j| / sum_j p_j, doubled for margin. Prints the largest
// error over each path's bound,
// "avx512=<ratio> tiles=<ratio|none> avx2=<ratio|none> hidden=<hidden key blocks> same=<1: skipping changed
// no output bit>". ATTN_FP_FLAGS=1 runs each path on this thread alone instead and prints the MXCSR flags it raised
// there, "avx512_subnormal=<0|1> ...": 1 where an F32 operation took or gave a subnormal (DE or UE), which Intel
// cores do in a microcode assist each (a softmax whose 2^x gave 2^-127 for every masked key ran 1.8-3x
// slower there: bench/README.md); AMD's do not slow down, so only this flag shows it on every CPU.
#include "kernels/dispatch.h"
#include "kernels/x86/attn_bf16.h"
#include "kernels/x86/entry_points.h"
#include "timing.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <xmmintrin.h>

using namespace mllama;

static float bf16_round(float x) { return ggml_bf16_to_fp32(ggml_fp32_to_bf16(x)); }

static bool g_pad_mask = false;    // ATTN_MASK=pad or tower
static int64_t g_tile_rows = 0;    // ATTN_MASK=tower: rows per tile (1608); the last 7 of each are padding

static bool padding(int64_t i, int64_t N) {
    if (g_tile_rows) return i % g_tile_rows >= g_tile_rows - 7;
    return i >= N / 3 || i % 37 == 36;
}

static bool masked(int64_t i, int64_t j, int64_t N) {
    if (g_pad_mask) return padding(i, N) && padding(j, N);
    return i == N - 1 || (i % 3 == 0 && (j * 7 + i) % 5 == 0);
}

// Mask rows with no hidden key block (the attention then skips nothing), and the number of hidden blocks in rows.
static ggml_tensor * rows_without_skips(ggml_context * ctx, const ggml_tensor * rows, int64_t N, int * n_hidden) {
    ggml_tensor * plain = ggml_dup_tensor(ctx, rows);  // [N + Np / 64]
    const auto * in = static_cast<const int32_t *>(rows->data);
    auto * out = static_cast<int32_t *>(plain->data);
    *n_hidden = 0;
    for (int64_t i = 0; i < rows->ne[0]; ++i) {
        out[i] = i < N ? in[i] : 0;
        *n_hidden += i >= N && in[i];
    }
    return plain;
}

static bool same_bits(const ggml_tensor * a, const ggml_tensor * b) {
    return std::memcmp(a->data, b->data, ggml_nbytes(a)) == 0;
}

// The largest |out - ref| / bound over all outputs (out: [D * H, N] F32); f32: the AVX2 path's bound.
static double worst_ratio(const ggml_tensor * out, const std::vector<float> & q, const std::vector<float> & k,
                          const std::vector<float> & v, int64_t D, int64_t H, int64_t N, bool f32 = false) {
    const double u = std::ldexp(1.0, -24), gamma_d = D * u / (1 - D * u), gamma_n = N * u / (1 - N * u);
    // as the kernels scale q: the BF16 paths by log2(e) / sqrt(D) (their scores are in base 2), AVX2 by 1 / sqrt(D)
    const float scale = f32 ? 1.0f / std::sqrt(static_cast<float>(D)) : attn::query_scale(D);
    const double to_natural = f32 ? 1.0 : std::log(2.0);  // a base-2 score times ln 2
    double worst = 0;
    std::vector<double> p(static_cast<size_t>(N));
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < N; ++i) {
            double m = -std::numeric_limits<double>::infinity(), largest = 0;  // largest: max_j sum_d |q_d k_jd|
            for (int64_t j = 0; j < N; ++j) {
                double s = 0, abs_s = 0;
                for (int64_t d = 0; d < D; ++d) {
                    const float qd = q[(i * H + h) * D + d] * scale;
                    s += double(f32 ? qd : bf16_round(qd)) * k[(j * H + h) * D + d];
                    abs_s += std::fabs(double(qd) * k[(j * H + h) * D + d]);
                }
                p[j] = masked(i, j, N) ? -std::numeric_limits<double>::infinity() : s * to_natural;
                m = std::max(m, p[j]);
                largest = std::max(largest, abs_s * to_natural);
            }
            const double relative = f32 ? 2 * (2 * gamma_d * largest + 4e-7 + 2 * gamma_n) : 2 * std::ldexp(1.0, -8);
            double sum = 0;
            for (int64_t j = 0; j < N; ++j) sum += p[j] = std::isinf(m) ? 0.0 : std::exp(p[j] - m);
            for (int64_t d = 0; d < D; ++d) {
                double o = 0, abs_o = 0;
                for (int64_t j = 0; j < N; ++j) o += p[j] * v[(j * H + h) * D + d], abs_o += p[j] * std::fabs(v[(j * H + h) * D + d]);
                const double ref = sum > 0 ? o / sum : 0.0, bound = relative * (sum > 0 ? abs_o / sum : 0.0) + 1e-30;
                const double got = static_cast<const float *>(out->data)[i * D * H + h * D + d];
                worst = std::max(worst, std::fabs(got - ref) / bound);
            }
        }
    }
    return worst;
}

static const char * const k_names[3] = {"avx512", "tiles", "avx2"};

// Median milliseconds and GFLOPS of each path that runs here (gflop: the two products' work).
static void print_times(ggml_context * ctx, ggml_tensor * const outs[3], const bool runs[3], double gflop, int threads,
                        int reps) {
    for (int i = 0; i < 3; ++i) {
        if (!runs[i]) {
            std::printf("%s_ms=none ", k_names[i]);
            continue;
        }
        ggml_cgraph * graph = ggml_new_graph(ctx);
        ggml_build_forward_expand(graph, outs[i]);
        const double ms = median_ms(ctx, {graph}, threads, reps);
        std::printf("%s_ms=%.3f %s_gflops=%.1f ", k_names[i], ms, k_names[i], gflop / ms * 1e3);
    }
#ifdef MLLAMA_AMX_ATTN_PHASES
    uint64_t ticks[4];
    attn::tile_phase_ticks(ticks);
    const double total = double(ticks[0] + ticks[1] + ticks[2] + ticks[3]) + 1e-9;
    std::printf("tiles_phases=scores:%.2f,pv:%.2f,softmax:%.2f,update:%.2f ", ticks[0] / total, ticks[1] / total,
                ticks[2] / total, ticks[3] / total);
#endif
    std::printf("\n");
}

// Each path on this thread alone (ggml's thread 0 is its caller): whether its F32 operations raised MXCSR's
// denormal-operand (DE) or underflow (UE) flag.
static void print_subnormal_flags(ggml_context * ctx, ggml_tensor * const outs[3], const bool runs[3]) {
    for (int i = 0; i < 3; ++i) {
        if (!runs[i]) {
            std::printf("%s_subnormal=none ", k_names[i]);
            continue;
        }
        ggml_cgraph * graph = ggml_new_graph(ctx);
        ggml_build_forward_expand(graph, outs[i]);
        _mm_setcsr(_mm_getcsr() & ~0x3Fu);  // the six exception flags cleared
        ggml_graph_compute_with_ctx(ctx, graph, 1);
        const unsigned flags = _mm_getcsr();
        std::printf("%s_subnormal=%d ", k_names[i], (flags & (_MM_EXCEPT_DENORM | _MM_EXCEPT_UNDERFLOW)) ? 1 : 0);
    }
    std::printf("\n");
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s D H N [threads] [reps]\n", argv[0]);
        return 2;
    }
    const int64_t D = std::atoll(argv[1]), H = std::atoll(argv[2]), N = std::atoll(argv[3]);
    const int threads = argc > 4 ? std::atoi(argv[4]) : 2, reps = argc > 5 ? std::atoi(argv[5]) : 0;
    const char * mask_mode = std::getenv("ATTN_MASK");
    g_pad_mask = mask_mode && (std::strcmp(mask_mode, "pad") == 0 || std::strcmp(mask_mode, "tower") == 0);
    if (mask_mode && std::strcmp(mask_mode, "tower") == 0) g_tile_rows = 1608;
    if (!avx2_kernels_available()) {
        std::printf("skip: no AVX2 on this CPU\n");
        return 0;
    }
    ggml_init_params params{static_cast<size_t>(80 * D * H * N + 4 * N * N) + (size_t(64) << 20), nullptr, false};
    ggml_context * ctx = ggml_init(params);
    std::mt19937_64 rng(static_cast<uint64_t>(D * 1000003 + H * 31 + N));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    ggml_tensor * t[3];
    std::vector<float> vals[3];  // q as given; k and v as the kernel rounds them
    for (int a = 0; a < 3; ++a) {
        t[a] = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, H, N);  // [D, H, N]
        vals[a].resize(static_cast<size_t>(D * H * N));
        for (int64_t i = 0; i < D * H * N; ++i) {
            // larger q: peaked softmax rows too; every 97th key 6x larger from key 50 on: row maxima that
            // jump after the first blocks (the running maximum moves, the earlier sums are rescaled)
            const bool jump = a == 1 && (i / (D * H)) % 97 == 50;
            const float x = normal(rng) * (a == 0 ? 2.0f : jump ? 6.0f : 1.0f);
            static_cast<float *>(t[a]->data)[i] = x;
            vals[a][i] = a == 0 ? x : bf16_round(x);
        }
    }
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, N, N);  // [N, N]
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j)
            static_cast<ggml_fp16_t *>(mask->data)[i * N + j] =
                ggml_fp32_to_fp16(masked(i, j, N) ? -std::numeric_limits<float>::infinity() : 0.0f);
    ggml_tensor * rows = bf16_attention_mask_rows(ctx, mask);
    ggml_cgraph * rows_graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(rows_graph, rows);
    ggml_graph_compute_with_ctx(ctx, rows_graph, threads);
    int n_hidden = 0;
    ggml_tensor * plain_rows = rows_without_skips(ctx, rows, N, &n_hidden);
    const bool avx512_run = cpu_kernels_available(), tiles_run = amx_tiles_available();
    ggml_tensor * outs[3] = {nullptr, nullptr, attention_avx2(ctx, t[0], t[1], t[2], mask, rows)};  // avx512, tiles, avx2
    ggml_tensor * plain[3] = {nullptr, nullptr, attention_avx2(ctx, t[0], t[1], t[2], mask, plain_rows)};
    if (avx512_run) {
        for (int tiles = 0; tiles < 2; ++tiles) {
            outs[tiles] = bf16_attention_avx512(ctx, t[0], t[1], t[2], mask, rows, tiles == 1);
            plain[tiles] = bf16_attention_avx512(ctx, t[0], t[1], t[2], mask, plain_rows, tiles == 1);
        }
    }
    bool runs[3] = {avx512_run, tiles_run, true};
    if (std::getenv("ATTN_FP_FLAGS") && std::strcmp(std::getenv("ATTN_FP_FLAGS"), "1") == 0) {
        print_subnormal_flags(ctx, outs, runs);
        ggml_free(ctx);
        return 0;
    }
    if (reps > 0) {
        const char * only = std::getenv("ATTN_ONLY");  // avx512, tiles or avx2: time that path alone
        for (int i = 0; i < 3 && only; ++i) runs[i] = runs[i] && std::strcmp(only, k_names[i]) == 0;
        print_times(ctx, outs, runs, 4.0 * D * double(N) * N * H / 1e9, threads, reps);
        ggml_free(ctx);
        return 0;
    }
    ggml_cgraph * graph = ggml_new_graph(ctx);
    for (int i = 0; i < 3; ++i)
        if (runs[i]) ggml_build_forward_expand(graph, outs[i]), ggml_build_forward_expand(graph, plain[i]);
    ggml_graph_compute_with_ctx(ctx, graph, threads);
    bool same = true;
    for (int i = 0; i < 3; ++i) same = same && (!runs[i] || same_bits(outs[i], plain[i]));
    for (int i = 0; i < 2; ++i) {
        if (runs[i]) std::printf("%s=%.4f ", k_names[i], worst_ratio(outs[i], vals[0], vals[1], vals[2], D, H, N));
        else std::printf("%s=none ", k_names[i]);
    }
    std::printf("avx2=%.4f ", worst_ratio(outs[2], vals[0], vals[1], vals[2], D, H, N, /*f32=*/true));
    std::printf("hidden=%d same=%d\n", n_hidden, same ? 1 : 0);
    ggml_free(ctx);
    return 0;
}
