// The vision tower's BF16 GEMM on Intel AMX tiles (see kernels/x86/gemm_bf16.h for the layout).
//
// y[n][m] = sum_k x[n][k] w[m][k]: tokens are the rows of A tiles (a BF16 token row is already 16
// k pairs per 64 bytes), the packed weight panels are B tiles as they lie (16 pair rows x 16
// channels, row stride one panel row), C tiles hold 16 tokens x 16 channels in F32. A step keeps
// 32 tokens x 32 channels in four C tiles over the whole k range (2 A + 2 B tile loads per 4 tile
// products), then stores them once for the AVX-512 epilogue (bias, GELU, BF16 or F32 out).
// A thread walks its tokens in blocks that stay in L2 while every panel passes over them.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/gemm_bf16.h"

#include "ggml.h"

#include <cstring>
#include <vector>


namespace mllama {

namespace gemm {
namespace {

constexpr int k_step = 2 * amx::k_tile_rows;  // tokens per step: two A tiles
constexpr int64_t k_block_bytes = 1 << 20;    // BF16 activation bytes per token block (an L2 share)

// Tiles: C(i, j) = tmm(2 i + j) for tokens 16 i.. and channels 16 j..; A(i) = tmm(4 + i); B(j) = tmm(6 + j).
// x: 32 token rows (stride x_stride bytes), wp: the panel's first pair row at channel group g (stride
// wp_stride bytes), P pairs (P % 16 == 0) -> c [32 tokens][32 channels] F32. NB: B tiles (1 or 2).
template <class Tiles, int NB>
MLLAMA_AMX_TARGET void step(const uint8_t * x, size_t x_stride, const uint8_t * wp, size_t wp_stride, int64_t P,
                            float * c) {
    Tiles::template zero<0>();
    Tiles::template zero<2>();
    if constexpr (NB == 2) Tiles::template zero<1>(), Tiles::template zero<3>();
    for (int64_t p = 0; p < P; p += amx::k_tile_rows) {
        const uint8_t * a = x + p * 4;  // 16 pairs of 4 bytes
        const uint8_t * b = wp + p * wp_stride;
        Tiles::template load<4>(a, x_stride);
        Tiles::template load<5>(a + amx::k_tile_rows * x_stride, x_stride);
        Tiles::template load<6>(b, wp_stride);
        Tiles::template dot_bf16<0, 4, 6>();
        Tiles::template dot_bf16<2, 5, 6>();
        if constexpr (NB == 2) {
            Tiles::template load<7>(b + amx::k_tile_bytes, wp_stride);
            Tiles::template dot_bf16<1, 4, 7>();
            Tiles::template dot_bf16<3, 5, 7>();
        }
    }
    constexpr size_t c_stride = 32 * sizeof(float);
    Tiles::template store<0>(c, c_stride);
    Tiles::template store<2>(c + 16 * 32, c_stride);
    if constexpr (NB == 2) Tiles::template store<1>(c + 16, c_stride), Tiles::template store<3>(c + 16 * 32 + 16, c_stride);
}

struct operands {
    const ggml_tensor * x;    // [K, N] BF16
    const uint8_t * wp;       // packed weights (all panels)
    const float * bias;       // [M] or null
    char * y;                 // dst data
    size_t y_row;             // dst->nb[1]
    size_t out_size;          // bytes per output value
    int64_t P, M;             // k pairs, output channels
};

// Tokens t0..t0+rows-1 (rows <= 32) against every panel: steps of 32 channels, the epilogue per step.
template <class Tiles>
MLLAMA_AMX_TARGET void token_step(const operands & o, const uint8_t * x, size_t x_stride, int64_t t0, int rows,
                                  const epilogue & ep, float * c) {
    const int64_t n_panels = (o.M + k_panel - 1) / k_panel;
    for (int64_t panel = 0; panel < n_panels; ++panel) {
        const int64_t groups = panel_groups(o.M, panel);
        const uint8_t * wp = o.wp + panel * k_panel * o.P * 4;  // full panels before this one
        const size_t wp_stride = static_cast<size_t>(groups) * amx::k_tile_bytes;
        for (int64_t g = 0; g < groups; g += 2) {
            const int nb = groups - g >= 2 ? 2 : 1;
            if (nb == 2) step<Tiles, 2>(x, x_stride, wp + g * amx::k_tile_bytes, wp_stride, o.P, c);
            else step<Tiles, 1>(x, x_stride, wp + g * amx::k_tile_bytes, wp_stride, o.P, c);
            for (int r = 0; r < rows; ++r) {
                char * out = o.y + (t0 + r) * o.y_row;
                for (int j = 0; j < nb; ++j) {
                    finish16(_mm512_loadu_ps(c + r * 32 + j * 16), o.bias, ep, out, panel * k_panel + (g + j) * 16);
                }
            }
        }
    }
}

template <class Tiles>
MLLAMA_AMX_TARGET void run(const operands & o, int64_t n0, int64_t n1, const epilogue & ep) {
    const ggml_tensor * x = o.x;
    const int64_t K = x->ne[0];
    const int64_t block = std::max<int64_t>(k_step, k_block_bytes / (K * 2) / k_step * k_step);
    alignas(64) float c[k_step * 32];
    std::vector<uint8_t> tail;  // the last < 32 tokens, zero-padded to a full step
    amx::tile_scope<Tiles> scope(amx::full_tiles());
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
        const int64_t b1 = std::min(n1, b0 + block);
        for (int64_t t = b0; t < b1; t += k_step) {
            const int rows = static_cast<int>(std::min<int64_t>(k_step, b1 - t));
            const auto * xr = static_cast<const uint8_t *>(x->data) + t * x->nb[1];
            if (rows == k_step) {
                token_step<Tiles>(o, xr, x->nb[1], t, rows, ep, c);
                continue;
            }
            tail.assign(static_cast<size_t>(k_step * K * 2), 0);
            for (int r = 0; r < rows; ++r) std::memcpy(tail.data() + r * K * 2, xr + r * x->nb[1], K * 2);
            token_step<Tiles>(o, tail.data(), K * 2, t, rows, ep, c);
        }
    }
}

}  // namespace

void gemm_tiles(ggml_tensor * dst, int ith, int nth, const epilogue & ep) {
    const ggml_tensor * x = dst->src[1];
    const ggml_tensor * bias = dst->src[2];
    const int64_t N = x->ne[1];
    const operands o{x,         static_cast<const uint8_t *>(dst->src[0]->data),
                     bias ? static_cast<const float *>(bias->data) : nullptr,
                     static_cast<char *>(dst->data), dst->nb[1], ggml_type_size(dst->type), x->ne[0] / 2, dst->ne[0]};
    // tokens split in whole steps, so only the last thread has a partial one
    const int64_t steps = (N + k_step - 1) / k_step, per_thread = (steps + nth - 1) / nth;
    const int64_t n0 = std::min(N, per_thread * ith * k_step), n1 = std::min(N, n0 + per_thread * k_step);
    if (n0 >= n1) return;
    if (amx_tiles_emulated()) run<amx::emulated_tiles>(o, n0, n1, ep);
    else run<amx::hw_tiles>(o, n0, n1, ep);
}

}  // namespace gemm
}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
