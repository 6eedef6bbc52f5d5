// The vision tower's BF16 GEMM on Intel AMX tiles (see kernels/x86/gemm_bf16.h for the layout).
//
// y[n][m] = sum_k x[n][k] w[m][k]: tokens are the rows of A tiles (a BF16 token row is already 16
// k pairs per 64 bytes), the packed weight panels are B tiles as they lie (16 pair rows x 16
// channels, row stride one panel row), C tiles hold 16 tokens x 16 channels in F32. A step keeps
// 32 tokens x 32 channels in four C tiles over the whole k range (2 A + 2 B tile loads per 4 tile
// products), then stores them once for the AVX-512 epilogue (bias, GELU, BF16 or F32 out).
// A thread walks its tokens in small blocks (k_block_bytes); over each block, 32 channels of a panel
// at a time, so that their weights stay in L2 while the block's steps pass.
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
// BF16 activation bytes per token block (64 KiB: one step of 32 tokens at K = 1280 or 5120). Over the tower's
// three shapes on the 16-core Xeon of bench/README.md (2026-12-04, bench/amx_sweep.sh, which times others: -D
// at build time), 256 KiB took 15% less time than 1 or 4 MiB, and 64 KiB 10% less than 256 KiB in a second run
#ifndef MLLAMA_AMX_GEMM_BLOCK_BYTES
#define MLLAMA_AMX_GEMM_BLOCK_BYTES (64 << 10)
#endif
constexpr int64_t k_block_bytes = MLLAMA_AMX_GEMM_BLOCK_BYTES;

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
    const uint8_t * wp;  // packed weights (all panels)
    const float * bias;  // [M] or null
    char * y;            // dst data
    size_t y_row;        // dst->nb[1]
    int64_t P, M;        // k pairs, output channels
};

// Tokens of one block (rows of x, stride x_stride bytes; the first is token t0) against 32 channels
// from channel group g of a panel: one step per 32 tokens, the epilogue after each. The panel's slice
// (K x 32 BF16) stays in L2 while the block's tokens pass.
template <class Tiles>
MLLAMA_AMX_TARGET void channel_step(const operands & o, const uint8_t * x, size_t x_stride, int64_t t0, int64_t n_tok,
                                    int64_t panel, int64_t g, const epilogue & ep, float * c) {
    const int64_t groups = panel_groups(o.M, panel);
    const uint8_t * wp = o.wp + panel * k_panel * o.P * 4 + g * amx::k_tile_bytes;  // full panels before this one
    const size_t wp_stride = static_cast<size_t>(groups) * amx::k_tile_bytes;
    const int nb = groups - g >= 2 ? 2 : 1;
    for (int64_t t = 0; t < n_tok; t += k_step) {
        if (nb == 2) step<Tiles, 2>(x + t * x_stride, x_stride, wp, wp_stride, o.P, c);
        else step<Tiles, 1>(x + t * x_stride, x_stride, wp, wp_stride, o.P, c);
        const int rows = static_cast<int>(std::min<int64_t>(k_step, n_tok - t));
        for (int r = 0; r < rows; ++r) {
            char * out = o.y + (t0 + t + r) * o.y_row;
            for (int j = 0; j < nb; ++j) {
                finish16(_mm512_loadu_ps(c + r * 32 + j * 16), o.bias, ep, out, panel * k_panel + (g + j) * 16);
            }
        }
    }
}

// Tokens n0..n1-1 (n0 a multiple of 32) in blocks that stay in L2, every panel over each block. A last
// partial step reads a zero-padded copy of its rows, so every A tile load has 16 rows.
template <class Tiles>
MLLAMA_AMX_TARGET void run(const operands & o, const ggml_tensor * x, int64_t n0, int64_t n1, const epilogue & ep) {
    const int64_t K = x->ne[0], n_panels = (o.M + k_panel - 1) / k_panel;
    const int64_t block = std::max<int64_t>(k_step, k_block_bytes / (K * 2) / k_step * k_step);
    alignas(64) float c[k_step * 32];
    static thread_local std::vector<uint8_t> tail;
    amx::tile_scope<Tiles> scope(amx::k_full_tiles);
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
        const int64_t b1 = std::min(n1, b0 + block);
        const int64_t full = (b1 - b0) / k_step * k_step;  // tokens in whole steps
        const auto * xb = static_cast<const uint8_t *>(x->data) + b0 * x->nb[1];
        if (full < b1 - b0) {
            tail.assign(static_cast<size_t>(k_step * K * 2), 0);
            for (int64_t r = 0; r < b1 - b0 - full; ++r) {
                std::memcpy(tail.data() + r * K * 2, xb + (full + r) * x->nb[1], static_cast<size_t>(K * 2));
            }
        }
        for (int64_t panel = 0; panel < n_panels; ++panel) {
            for (int64_t g = 0; g < panel_groups(o.M, panel); g += 2) {
                channel_step<Tiles>(o, xb, x->nb[1], b0, full, panel, g, ep, c);
                if (full < b1 - b0) channel_step<Tiles>(o, tail.data(), K * 2, b0 + full, b1 - b0 - full, panel, g, ep, c);
            }
        }
    }
}

}  // namespace

void gemm_tiles(ggml_tensor * dst, int ith, int nth, const epilogue & ep) {
    const ggml_tensor * x = dst->src[1];
    const ggml_tensor * bias = dst->src[2];
    const int64_t N = x->ne[1];
    const operands o{static_cast<const uint8_t *>(dst->src[0]->data), bias ? static_cast<const float *>(bias->data) : nullptr,
                     static_cast<char *>(dst->data), dst->nb[1], x->ne[0] / 2, dst->ne[0]};
    // tokens split in whole steps, so only the last thread has a partial one
    const int64_t steps = (N + k_step - 1) / k_step, per_thread = (steps + nth - 1) / nth;
    const int64_t n0 = std::min(N, per_thread * ith * k_step), n1 = std::min(N, n0 + per_thread * k_step);
    if (n0 >= n1) return;
    if (amx_tiles_emulated()) run<amx::emulated_tiles>(o, x, n0, n1, ep);
    else run<amx::hw_tiles>(o, x, n0, n1, ep);
}

}  // namespace gemm
}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
