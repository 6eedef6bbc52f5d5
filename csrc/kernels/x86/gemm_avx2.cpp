// BF16 GEMM for the vision tower's linear layers on AVX2 CPUs without AVX-512 BF16 (see
// kernels/dispatch.h): AMD Zen 1-3, Intel client cores, older Xeons, where ggml's BF16 product and
// torch's bf16 matmul run far below the CPU's F32 FMA peak (figures in bench/README.md).
//
// y[n][m] = sum_k w[m][k] x[n][k] (+ bias[m], then GELU): BF16 weights, F32 activations and F32
// accumulation (a BF16 weight is exact in F32, so only the order of the additions differs from an
// exact product with x). The weights are packed per call into groups of 16 channels, one k pair of
// each per 64 bytes (a BF16 value is the top half of an F32: shifted up 16 the pair's first value, masked
// the second). GotoBLAS-style blocking: a thread walks its tokens in blocks of 120 and the k range in
// chunks of 256; per block and chunk it packs x once as micro panels (120 KiB, in L2 for every group;
// AVX2 CPUs have 256 KiB-1 MiB of L2 per core), and per group widens the chunk's weights to F32 once
// (16 KiB, in L1) for all of the block's micro steps, each of which keeps 5 tokens x 16 channels in 10
// ymm sums: loads, broadcasts and FMAs only.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/simd_avx2.h"

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mllama {
namespace {

constexpr int k_rows = 5;                 // tokens per micro step (10 ymm sums; 6 rows measured no faster)
constexpr int64_t k_chunk_pairs = 128;    // k pairs per chunk: a group's weights 16 KiB in F32, a token's x 1 KiB
constexpr int64_t k_token_block = 120;    // tokens per block: their x chunk 120 KiB, in L2

// The custom op's userdata: one of these, indexed [gelu].
constexpr bool k_gelu[2] = {false, true};

// dst->src[0] = w [K, M] BF16 -> Wp [M / 16][K / 2][16] pairs: a group's pairs contiguous, so the chunk a
// micro step reads is 8 KiB in a row; groups split across threads, 16 pairs at a time (one cache line of
// each of the group's 16 rows).
void pack_w(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * w = dst->src[0];
    const int64_t K = w->ne[0], M = w->ne[1], P = K / 2;
    auto * out = static_cast<uint32_t *>(dst->data);
    for (int64_t g = ith; g < M / 16; g += nth) {
        uint32_t * o = out + g * 16 * P;
        for (int64_t p0 = 0; p0 < P; p0 += 16)
            for (int64_t c = 0; c < 16; ++c) {
                const char * row = static_cast<const char *>(w->data) + (g * 16 + c) * w->nb[1];
                for (int64_t p = p0; p < std::min(P, p0 + 16); ++p) std::memcpy(o + p * 16 + c, row + p * 4, 4);
            }
    }
}

// The x chunk of one token block as micro panels: [step][k][k_rows], the k_rows tokens of a micro step
// side by side for each k (a short step's missing tokens are zeros), so a micro step reads one stream.
void pack_x(const float * x, int64_t x_stride, int64_t tokens, int64_t k_count, float * out) {
    for (int64_t t0 = 0; t0 < tokens; t0 += k_rows) {
        float * o = out + t0 * k_count;
        for (int64_t k = 0; k < k_count; ++k)
            for (int64_t r = 0; r < k_rows; ++r) o[k * k_rows + r] = t0 + r < tokens ? x[(t0 + r) * x_stride + k] : 0.0f;
    }
}

// One group's weights of one k chunk in F32, [k][16]: converted once per (token block, chunk, group) and
// read by every micro step of the block, so the steps' inner loop is loads and FMAs only.
MLLAMA_AVX2_TARGET void widen_chunk(const uint32_t * wp, int64_t pairs, float * out) {
    const __m256 high = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    for (int64_t p = 0; p < pairs; ++p) {
        for (int h = 0; h < 2; ++h) {  // channels 8h..8h+7: (k = 2p, k = 2p + 1) pairs
            const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(wp + 16 * p + 8 * h));
            _mm256_store_ps(out + 32 * p + 8 * h, _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16)));  // k = 2p
            _mm256_store_ps(out + 32 * p + 16 + 8 * h, _mm256_and_ps(_mm256_castsi256_ps(pair), high));  // k = 2p + 1
        }
    }
}

struct gemm_args {
    int64_t k_count;        // k values of this chunk
    const float * w;        // this group's chunk, widen_chunk's [k][16]
    const float * bias;     // this group's bias (or null)
    bool first, last;       // the k range's first chunk (sums start at 0, else from y) and last (epilogue)
    bool gelu;
};

// R tokens (a micro panel of pack_x: [k][k_rows] floats) against one group of 16 channels, over one k
// chunk.
template <int R>
MLLAMA_AVX2_TARGET void micro(const gemm_args & a, const float * x, float * y, int64_t y_stride) {
    __m256 acc[2 * R];  // token r: channels 0-7 in acc[2r], 8-15 in acc[2r + 1]
#pragma GCC unroll 12
    for (int i = 0; i < 2 * R; ++i)
        acc[i] = a.first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + (i / 2) * y_stride + 8 * (i % 2));
    const float * w = a.w;
    for (int64_t k = 0; k < a.k_count; ++k, w += 16, x += k_rows) {
        const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m256 xb = _mm256_broadcast_ss(x + r);
            acc[2 * r] = _mm256_fmadd_ps(xb, w0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(xb, w1, acc[2 * r + 1]);
        }
    }
    // the sums leave the registers once, so the loop above keeps acc[] in registers
    alignas(32) float sums[2 * R * 8];
#pragma GCC unroll 12
    for (int i = 0; i < 2 * R; ++i) _mm256_store_ps(sums + 8 * i, acc[i]);
    for (int r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {
            __m256 v = _mm256_load_ps(sums + 8 * (2 * r + h));
            if (a.last && a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + 8 * h));
            if (a.last && a.gelu) v = simd::gelu256(v);
            _mm256_storeu_ps(y + r * y_stride + 8 * h, v);
        }
    }
}

using micro_fn = void (*)(const gemm_args &, const float *, float *, int64_t);
constexpr micro_fn k_micro[k_rows] = {micro<1>, micro<2>, micro<3>, micro<4>, micro<5>};

// dst [M, N] F32 = Wp x^T; dst->src = {Wp, x [K, N] F32, bias [M] F32 or null}; userdata: GELU or
// not; tokens split across threads. Per token block and k chunk, x is packed once (120 KiB, in L2 for
// every group) and each group's weights (8 KiB, in L1) serve every micro step; the sums wait in y
// between chunks.
void gemm_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const bool gelu = *static_cast<const bool *>(userdata);
    const ggml_tensor * x = dst->src[1];
    const ggml_tensor * bias = dst->src[2];
    const int64_t K = x->ne[0], N = x->ne[1], M = dst->ne[0], P = K / 2;
    const int64_t per_thread = (N + nth - 1) / nth;
    const int64_t n0 = std::min(N, per_thread * ith), n1 = std::min(N, n0 + per_thread);
    const int64_t x_stride = static_cast<int64_t>(x->nb[1] / sizeof(float));
    const int64_t y_stride = static_cast<int64_t>(dst->nb[1] / sizeof(float));
    const auto * wp = static_cast<const uint32_t *>(dst->src[0]->data);
    thread_local std::vector<float> xp, wf;  // this thread's packed x chunk and widened weight chunk
    xp.resize(static_cast<size_t>(k_token_block + k_rows) * 2 * k_chunk_pairs);
    wf.resize(static_cast<size_t>(2 * k_chunk_pairs * 16 + 8));
    float * w_chunk = wf.data() + (8 - reinterpret_cast<uintptr_t>(wf.data()) / sizeof(float) % 8) % 8;  // 32-byte aligned
    for (int64_t b0 = n0; b0 < n1; b0 += k_token_block) {
        const int64_t b1 = std::min(n1, b0 + k_token_block);
        for (int64_t p0 = 0; p0 < P; p0 += k_chunk_pairs) {
            const int64_t pairs = std::min(k_chunk_pairs, P - p0);
            pack_x(static_cast<const float *>(x->data) + b0 * x_stride + 2 * p0, x_stride, b1 - b0, 2 * pairs, xp.data());
            for (int64_t g = 0; g < M / 16; ++g) {
                widen_chunk(wp + (g * P + p0) * 16, pairs, w_chunk);
                const gemm_args a{2 * pairs, w_chunk, bias ? static_cast<const float *>(bias->data) + 16 * g : nullptr,
                                  p0 == 0, p0 + pairs == P, gelu};
                for (int64_t t = b0; t < b1; t += k_rows) {
                    const int rows = static_cast<int>(std::min<int64_t>(k_rows, b1 - t));
                    float * y = static_cast<float *>(dst->data) + t * y_stride + 16 * g;
                    k_micro[rows - 1](a, xp.data() + (t - b0) * 2 * pairs, y, y_stride);
                }
            }
        }
    }
}

}  // namespace

ggml_tensor * bf16_linear_avx2(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias, bool gelu) {
    const int64_t K = w->ne[0], M = w->ne[1], N = ggml_nelements(x) / K;
    ggml_tensor * wp = ggml_custom_4d(ctx, GGML_TYPE_I32, K / 2 * M, 1, 1, 1, &w, /*n_args=*/1, pack_w,
                                      GGML_N_TASKS_MAX, /*userdata=*/nullptr);  // Wp [K / 2 * M]
    if (x->type != GGML_TYPE_F32) x = ggml_cast(ctx, x, GGML_TYPE_F32);  // [K, N] F32 (exact from BF16/F16)
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    x = ggml_reshape_2d(ctx, x, K, N);
    ggml_tensor * args[] = {wp, x, bias};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, M, N, 1, 1, args, bias ? 3 : 2, gemm_op, GGML_N_TASKS_MAX,
                          const_cast<bool *>(&k_gelu[gelu ? 1 : 0]));  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
