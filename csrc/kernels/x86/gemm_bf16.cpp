// BF16 GEMM for the vision tower's linear layers on AVX-512 BF16 CPUs (see kernels/dispatch.h).
//
// y[n][m] = sum_k w[m][k] x[n][k] (+ bias[m], then GELU), BF16 operands, F32 accumulation.
// vdpbf16ps adds a.pair[i] . b.pair[i] into lane i, so the weights are packed per call into
// panels of 64 output channels, one zmm per 16 channels and k pair (kernels/x86/gemm_bf16.h):
//   Wp[panel][k/2][m%64] = (W[m][k], W[m][k+1])
// and x (BF16 rows, k contiguous) is already a row of k pairs: each pair is broadcast. A micro
// step keeps 6 tokens x 64 channels in 24 zmm accumulators over the whole k range; a thread walks
// its tokens in blocks that fit the L3 share, and each weight panel stays in L2 for a block.
// With the AMX kernel allowed and available, the same packed panels go to kernels/x86/gemm_amx.cpp.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/gemm_bf16.h"
#include "kernels/x86/simd_math.h"

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mllama {
using namespace gemm;
namespace {

constexpr int k_rows = 6;                        // tokens per micro step
constexpr int64_t k_block_bytes = 1 << 21;       // BF16 activation bytes per token block (L3 share)

// The custom op's userdata: one of these, indexed [gelu][bf16_out][tiles].
constexpr epilogue k_epilogues[2][2][2] = {{{{false, false, false}, {false, false, true}}, {{false, true, false}, {false, true, true}}},
                                           {{{true, false, false}, {true, false, true}}, {{true, true, false}, {true, true, true}}}};

// dst->src[0] = w [K, M] BF16 -> Wp; panels split across threads. 16 rows x 16 k pairs (a cache line of each
// row) at a time, transposed in registers (16-row gathers took 1.57 s of a 4-tile image on Zen 4, this 0.23 s).
MLLAMA_AVX512_TARGET void pack_w(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * w = dst->src[0];
    const int64_t K = w->ne[0], M = w->ne[1], P = K / 2, n_panels = (M + k_panel - 1) / k_panel;
    uint32_t * out = aligned_panels(dst->data);
    for (int64_t panel = ith; panel < n_panels; panel += nth) {
        const int64_t groups = panel_groups(M, panel);
        uint32_t * o = out + panel * k_panel * P;  // full panels before this one
        for (int64_t g = 0; g < groups; ++g) {
            const char * first = static_cast<const char *>(w->data) + (panel * k_panel + g * 16) * w->nb[1];
            for (int64_t p0 = 0; p0 < P; p0 += 16) {
                const int64_t n_pairs = std::min<int64_t>(16, P - p0);
                const __mmask16 valid = static_cast<__mmask16>((1u << n_pairs) - 1);
                __m512i rows[16], cols[16];  // rows[i]: channel i's pairs p0..; cols[j]: pair p0 + j's 16 channels
                for (int i = 0; i < 16; ++i)
                    rows[i] = _mm512_maskz_loadu_epi32(valid, first + i * w->nb[1] + p0 * sizeof(uint32_t));
                simd::transpose16(rows, cols);
                for (int64_t j = 0; j < n_pairs; ++j) _mm512_storeu_si512(o + ((p0 + j) * groups + g) * 16, cols[j]);
            }
        }
    }
}

struct gemm_args {
    int64_t P;              // k pairs
    const uint32_t * wp;    // this panel's packed weights: [P][C * 16]
    const float * bias;     // this panel's bias (or null)
    epilogue ep;
};

// Tokens x0..x0+R-1 (rows of x, stride x_stride pairs) against C groups of 16 channels.
template <int R, int C>
MLLAMA_AVX512_TARGET void micro(const gemm_args & a, const uint32_t * x, int64_t x_stride, char * y, size_t y_stride) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint32_t * wp = a.wp;
    for (int64_t p = 0; p < a.P; ++p, wp += C * 16) {
        __m512bh w[C];
        for (int c = 0; c < C; ++c) w[c] = (__m512bh) _mm512_loadu_si512(wp + c * 16);
        for (int r = 0; r < R; ++r) {
            const __m512bh xb = (__m512bh) _mm512_set1_epi32(static_cast<int>(x[r * x_stride + p]));
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xb, w[c]);
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) finish16(acc[r][c], a.bias, a.ep, y + r * y_stride, 16 * c);
    }
}

using micro_fn = void (*)(const gemm_args &, const uint32_t *, int64_t, char *, size_t);

template <int C>
micro_fn micro_for_rows(int rows) {
    static const micro_fn table[] = {micro<1, C>, micro<2, C>, micro<3, C>, micro<4, C>, micro<5, C>, micro<6, C>};
    return table[rows - 1];
}

micro_fn micro_for(int rows, int64_t groups) {
    switch (groups) {
        case 1: return micro_for_rows<1>(rows);
        case 2: return micro_for_rows<2>(rows);
        case 3: return micro_for_rows<3>(rows);
        default: return micro_for_rows<4>(rows);
    }
}

// dst [M, N] = Wp x^T; dst->src = {Wp, x [K, N] BF16, bias [M] F32 or null}; userdata: the epilogue;
// tokens split across threads.
void gemm_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const epilogue ep = *static_cast<const epilogue *>(userdata);
    if (ep.tiles) return gemm_tiles(dst, ith, nth, ep);
    const ggml_tensor * x = dst->src[1];
    const ggml_tensor * bias = dst->src[2];
    const int64_t K = x->ne[0], N = x->ne[1], M = dst->ne[0], P = K / 2;
    const int64_t n_panels = (M + k_panel - 1) / k_panel;
    const int64_t per_thread = (N + nth - 1) / nth;
    const int64_t n0 = std::min(N, per_thread * ith), n1 = std::min(N, n0 + per_thread);
    const int64_t block = std::max<int64_t>(k_rows * 8, k_block_bytes / (K * 2) / k_rows * k_rows);
    const int64_t x_stride = static_cast<int64_t>(x->nb[1] / sizeof(uint32_t));
    const size_t out_size = ggml_type_size(dst->type);
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
        const int64_t b1 = std::min(n1, b0 + block);
        for (int64_t panel = 0; panel < n_panels; ++panel) {
            const int64_t groups = panel_groups(M, panel);
            gemm_args a{P, aligned_panels(dst->src[0]->data) + panel * k_panel * P,
                        bias ? static_cast<const float *>(bias->data) + panel * k_panel : nullptr,
                        ep};
            for (int64_t t = b0; t < b1; t += k_rows) {
                const int rows = static_cast<int>(std::min<int64_t>(k_rows, b1 - t));
                const auto * xr = reinterpret_cast<const uint32_t *>(static_cast<const char *>(x->data) + t * x->nb[1]);
                char * yr = static_cast<char *>(dst->data) + t * dst->nb[1] + panel * k_panel * out_size;
                micro_for(rows, groups)(a, xr, x_stride, yr, dst->nb[1]);
            }
        }
    }
}

}  // namespace

bool bf16_linear_supported(const ggml_tensor * w) {
    return cpu_kernel_available(cpu_kernel::gemm) && w->type == GGML_TYPE_BF16 && w->ne[0] % 2 == 0 && w->ne[1] % 16 == 0 &&
           ggml_is_contiguous(w) && w->ne[2] == 1 && w->ne[3] == 1;
}

ggml_tensor * bf16_linear_avx512(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias, bool gelu,
                                 bool bf16_out, bool tiles) {
    const int64_t K = w->ne[0], M = w->ne[1], N = ggml_nelements(x) / K;
    // Wp [K / 2 * M], 64-byte aligned within
    ggml_tensor * wp = ggml_custom_4d(ctx, GGML_TYPE_I32, K / 2 * M + k_panel_pad / 4, 1, 1, 1, &w, /*n_args=*/1,
                                      pack_w, GGML_N_TASKS_MAX, /*userdata=*/nullptr);
    if (x->type != GGML_TYPE_BF16) x = ggml_cast(ctx, x, GGML_TYPE_BF16);  // [K, N] BF16
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    x = ggml_reshape_2d(ctx, x, K, N);
    const epilogue * ep = &k_epilogues[gelu ? 1 : 0][bf16_out ? 1 : 0][tiles && amx_tiles_available() && K % 32 == 0 ? 1 : 0];
    ggml_tensor * args[] = {wp, x, bias};
    return ggml_custom_4d(ctx, bf16_out ? GGML_TYPE_BF16 : GGML_TYPE_F32, M, N, 1, 1, args, bias ? 3 : 2, gemm_op,
                          GGML_N_TASKS_MAX, const_cast<epilogue *>(ep));  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
