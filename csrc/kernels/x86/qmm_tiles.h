// What the quantized products on AMX tiles share (kernels/x86/qmm_q4k_amx.cpp: Q4_K in ggml's repacked layout,
// qmm_q6k_amx.cpp: Q6_K in the file layout; kernels/dispatch.h's q4k_matmul_tiles and q6k_matmul_tiles): the rows
// rounded to BF16 and padded to whole A tiles, and the passes of the rows over pairs of units of 16 output channels
// whose weights a Decoder turns into BF16 B tiles.
//
// Output channels go in units of 16 (the columns of a B tile), split across threads. A unit's weights are decoded
// once per call into B tiles, one per 32-weight sub-block of the k range: tile row p holds the pair (2p, 2p + 1)
// of the sub-block's weights of all 16 channels as BF16. Units go in pairs, the rows 32 at a time: four C tiles (2 x
// 16 rows x 2 x 16 channels, F32) accumulate over a slab of the k range, A in tiles 4 and 5, B in 6 and 7 (a tile
// load per product; one unit and 64 rows took 1.25: 0.7-0.9x the time of that at 32-128 rows, least of 6-10 runs
// taking turns, e.g. 64 rows of a Q4_K [4096 -> 14336] 9.2 against 11.2 ms, of a Q6_K [14336 -> 4096] 11.0
// against 12.3, of a Q4_K [4096 -> 4096] 2.9 against 3.5; the same for a [4096 -> 1024]);
// slabs keep the rows' part in L2 across a thread's pairs, and C goes back to dst between them. The next pair's tiles
// are decoded during a pair's passes, a Decoder step after each tile product: the vector units decode while the tile
// unit multiplies, in small steps (a large one fills the core's window of instructions before the next products). On
// the 2-core AMX Xeon of bench/README.md (least of 6-12 runs taking turns; its speed drifts between runs), 64 rows
// of a Q4_K [4096 -> 14336]: 9.3 ms with a step a sub-block against 11.5 decoding first, then 11.8 with four steps
// against 15.2 with one in a slower hour; 64 rows of a Q6_K [14336 -> 4096]: 16.1 ms with a step a sub-block, 14.3
// with two (our Q6_K kernel in that run: 19.2), 13.1 with four (in that run: 20.0).
//
// A Decoder(w, unit, b0, nb, panel) decodes the unit's blocks b0..b0 + nb - 1 (256 weights each) into panel, 8
// tiles a block, in k_steps_per_tile calls of step() a tile (finish(): all that is left).
#pragma once

#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/cache_lines.h"
#include "kernels/x86/simd_math.h"

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mllama::qmm_tiles {

constexpr int64_t k_block = 256;    // weights per quantized block (Q4_K, Q6_K)
constexpr int64_t k_unit = 16;      // output channels per pass: the 16 columns of a B tile
constexpr int64_t k_sub = 32;       // weights per sub-block: the 32 BF16 of an A tile row
constexpr int64_t k_tiles_per_block = k_block / k_sub;
constexpr int64_t k_steps_per_tile = 4;  // a decoder's steps per tile it decodes
constexpr int64_t k_tile_bytes = amx::k_tile_rows * amx::k_tile_bytes;  // 1 KiB
// BF16 rows per slab of the k range: they stay in L2 (2 MiB a core on Sapphire Rapids) next to a unit's B tiles
// of the slab while every unit of a thread passes over them. An estimate, to be tuned on an AMX machine.
#ifndef MLLAMA_AMX_Q4K_SLAB_BYTES
#define MLLAMA_AMX_Q4K_SLAB_BYTES (256 << 10)
#endif
constexpr int64_t k_slab_bytes = MLLAMA_AMX_Q4K_SLAB_BYTES;

// Where C tile i of a row pass lives between slabs: its 16 rows of dst (channels c0..c0 + 15), or, for a tile
// that runs past the last row, the unit's 16 x 16 floats in a side buffer.
struct c_home {
    uint8_t * p;
    size_t stride;
};

// The BF16 rows of the products (bf16_tile_rows): a tensor of padded + 1 rows, the rows from the first cache-line
// boundary of its data on (kernels/x86/cache_lines.h; a row is a multiple of 64 bytes), the last row slack.
inline int64_t padded_rows(const ggml_tensor * xb) { return xb->ne[1] - 1; }

// A pass of 32 rows (x, NR row tiles) over a pair of units (NB of them; their panels) for n_tiles sub-blocks:
// C(i, j) = tmm(2 i + j) (+)= A (tmm 4 + i: rows 16 i..) B (tmm 6 + j: unit j's tile), c[2 i + j] its home; C starts
// at zero on the first slab, else from its home, and goes back there. next: the next pair's decoders (or nulls),
// `steps` steps of one of them after each product, taking turns.
template <class Tiles, int NR, int NB, class Decoder>
MLLAMA_AMX_TARGET void pair_pass(const uint8_t * const panel[2], int64_t n_tiles, const uint8_t * x, size_t x_row,
                                 bool first, const c_home * c, Decoder * const next[2], int steps) {
    if (first) {
        Tiles::template zero<0>();
        if constexpr (NB > 1) Tiles::template zero<1>();
        if constexpr (NR > 1) Tiles::template zero<2>();
        if constexpr (NR > 1 && NB > 1) Tiles::template zero<3>();
    } else {
        Tiles::template load<0>(c[0].p, c[0].stride);
        if constexpr (NB > 1) Tiles::template load<1>(c[1].p, c[1].stride);
        if constexpr (NR > 1) Tiles::template load<2>(c[2].p, c[2].stride);
        if constexpr (NR > 1 && NB > 1) Tiles::template load<3>(c[3].p, c[3].stride);
    }
    auto decode = [&](int d) {
        for (int s = 0; next[d] && s < steps; ++s) next[d]->step();
    };
    const size_t a_stride = amx::k_tile_rows * x_row;
    for (int64_t t = 0; t < n_tiles; ++t) {
        const uint8_t * a = x + t * amx::k_tile_bytes;
        Tiles::template load<4>(a, x_row);
        Tiles::template load<6>(panel[0] + t * k_tile_bytes, amx::k_tile_bytes);
        Tiles::template dot_bf16<0, 4, 6>();
        decode(0);
        if constexpr (NR > 1) Tiles::template load<5>(a + a_stride, x_row), Tiles::template dot_bf16<2, 5, 6>();
        decode(1);
        if constexpr (NB > 1) Tiles::template load<7>(panel[1] + t * k_tile_bytes, amx::k_tile_bytes);
        if constexpr (NB > 1) Tiles::template dot_bf16<1, 4, 7>();
        decode(0);
        if constexpr (NR > 1 && NB > 1) Tiles::template dot_bf16<3, 5, 7>();
        decode(1);
    }
    Tiles::template store<0>(c[0].p, c[0].stride);
    if constexpr (NB > 1) Tiles::template store<1>(c[1].p, c[1].stride);
    if constexpr (NR > 1) Tiles::template store<2>(c[2].p, c[2].stride);
    if constexpr (NR > 1 && NB > 1) Tiles::template store<3>(c[3].p, c[3].stride);
}

// One slab (sub-blocks t0.. of the panels, n_tiles of them) of a pair of units (channels c0..c0 + 16 NB - 1) for all
// rows, 32 at a time; tail[j]: unit j's side buffer for the row tile past the last row. The next pair's decoders
// take 2 steps a tile step (4 where one pass covers all rows): a unit's 4 steps a tile over two passes.
template <class Tiles, int NB, class Decoder>
MLLAMA_AMX_TARGET void pair_slab(const uint8_t * const panel[2], int64_t t0, int64_t n_tiles, const ggml_tensor * xb,
                                 ggml_tensor * dst, int64_t c0, uint8_t * const tail[2], Decoder * const next[2]) {
    const int64_t n_rows = dst->ne[1], padded = padded_rows(xb);
    const int steps = padded <= 2 * amx::k_tile_rows ? 2 : 1;
    for (int64_t r0 = 0; r0 < padded; r0 += 2 * amx::k_tile_rows) {
        const uint8_t * x = line_aligned<uint8_t>(xb->data) + r0 * xb->nb[1] + t0 * amx::k_tile_bytes;
        const int nr = (padded - r0) / amx::k_tile_rows >= 2 ? 2 : 1;
        c_home c[4];
        for (int i = 0; i < nr; ++i) {
            const int64_t r = r0 + i * amx::k_tile_rows;
            for (int j = 0; j < NB; ++j) {
                uint8_t * row = static_cast<uint8_t *>(dst->data) + r * dst->nb[1] + (c0 + k_unit * j) * sizeof(float);
                c[2 * i + j] = r + amx::k_tile_rows <= n_rows ? c_home{row, dst->nb[1]}
                                                              : c_home{tail[j], k_unit * sizeof(float)};
            }
        }
        if (nr == 2) pair_pass<Tiles, 2, NB, Decoder>(panel, n_tiles, x, xb->nb[1], t0 == 0, c, next, steps);
        else pair_pass<Tiles, 1, NB, Decoder>(panel, n_tiles, x, xb->nb[1], t0 == 0, c, next, steps);
    }
}

// dst [M, N] = w x^T, thread ith of nth; dst->src[0] = x rounded to BF16, zero rows up to a multiple of 16; w [K, M]:
// what Decoder reads. Threads take pairs of units. The k range goes in slabs whose BF16 rows (k_slab_bytes) stay in
// L2 while each of the thread's pairs multiplies its part of the slab, decoded into one of two pairs of panels
// during the pair before's passes; C accumulates in dst between slabs.
template <class Tiles, class Decoder>
MLLAMA_AMX_TARGET void product_on(ggml_tensor * dst, int ith, int nth, const ggml_tensor * w) {
    const ggml_tensor * xb = dst->src[0];
    const int64_t n_blocks = w->ne[0] / k_block, n_units = w->ne[1] / k_unit, padded = padded_rows(xb);
    const int64_t pairs_per_thread = ((n_units + 1) / 2 + nth - 1) / nth;
    const int64_t u0 = std::min(n_units, 2 * pairs_per_thread * ith), u1 = std::min(n_units, u0 + 2 * pairs_per_thread);
    if (u0 >= u1) return;
    const int64_t row_block_bytes = padded * amx::k_tile_bytes * k_tiles_per_block;  // all rows, one block's k
    const int64_t slab_blocks = std::clamp<int64_t>(k_slab_bytes / row_block_bytes, 1, n_blocks);
    const size_t panel_bytes = static_cast<size_t>(slab_blocks * k_tiles_per_block * k_tile_bytes);
    const size_t tail_bytes = amx::k_tile_rows * k_unit * sizeof(float);
    // two pairs' B tiles of a slab; the units' tail tiles (tile rows on cache lines: kernels/x86/cache_lines.h)
    static thread_local line_vector<uint8_t> panels, tails;
    panels.resize(4 * panel_bytes);
    tails.resize(static_cast<size_t>(u1 - u0) * tail_bytes);
    amx::tile_scope<Tiles> scope(amx::k_full_tiles);
    // job j: the pair from unit u0 + 2 (j % n_mine) (the last may hold one unit) of slab j / n_mine; panels 2 (j % 2)..
    const int64_t n_mine = (u1 - u0 + 1) / 2, n_jobs = (n_blocks + slab_blocks - 1) / slab_blocks * n_mine;
    auto unit_of = [&](int64_t j) { return u0 + 2 * (j % n_mine); };
    auto units_in = [&](int64_t j) { return static_cast<int>(std::min<int64_t>(2, u1 - unit_of(j))); };
    auto decoder_of = [&](int64_t j, int k) {  // unit k of job j's pair (k = 1 of a single unit: never stepped)
        const int64_t b0 = j / n_mine * slab_blocks, nb = std::min(slab_blocks, n_blocks - b0);
        return Decoder(w, unit_of(j) + std::min(k, units_in(j) - 1), b0, nb,
                       panels.data() + (j % 2 * 2 + k) * panel_bytes);
    };
    Decoder next0 = decoder_of(0, 0), next1 = decoder_of(0, 1);
    bool two = units_in(0) == 2;
    next0.finish();
    if (two) next1.finish();
    for (int64_t j = 0; j < n_jobs; ++j) {
        const int64_t b0 = j / n_mine * slab_blocks, u = unit_of(j), nb = std::min(slab_blocks, n_blocks - b0);
        Decoder * next[2] = {nullptr, nullptr};
        if (j + 1 < n_jobs) {
            next0 = decoder_of(j + 1, 0), next1 = decoder_of(j + 1, 1);
            two = units_in(j + 1) == 2;
            next[0] = &next0;
            next[1] = two ? &next1 : nullptr;
        }
        const uint8_t * const panel[2] = {panels.data() + j % 2 * 2 * panel_bytes,
                                          panels.data() + (j % 2 * 2 + 1) * panel_bytes};
        uint8_t * const tail[2] = {tails.data() + (u - u0) * tail_bytes,
                                   tails.data() + (std::min(u + 1, u1 - 1) - u0) * tail_bytes};
        const int64_t c0 = u * k_unit, t0 = b0 * k_tiles_per_block, n_tiles = nb * k_tiles_per_block;
        if (units_in(j) == 2) pair_slab<Tiles, 2, Decoder>(panel, t0, n_tiles, xb, dst, c0, tail, next);
        else pair_slab<Tiles, 1, Decoder>(panel, t0, n_tiles, xb, dst, c0, tail, next);
        next0.finish();
        if (two) next1.finish();
    }
    const int64_t n_rows = dst->ne[1], tail_row = n_rows / amx::k_tile_rows * amx::k_tile_rows;
    for (int64_t u = u0; u < u1 && tail_row < n_rows; ++u) {  // the rows of the tail tiles that exist
        for (int64_t r = tail_row; r < n_rows; ++r) {
            std::memcpy(static_cast<char *>(dst->data) + r * dst->nb[1] + u * k_unit * sizeof(float),
                        tails.data() + ((u - u0) * amx::k_tile_rows + r - tail_row) * k_unit * sizeof(float),
                        k_unit * sizeof(float));
        }
    }
}

// dst [K, padded] BF16 = dst->src[0] [K, N] F32 rounded to nearest even (as ggml's cast rounds), then zero rows up
// to padded (whole A tiles), from the first cache-line boundary of dst's data (padded_rows); threads split the rows.
// One op in place of ggml's pad and cast (the pad alone took ~0.75 ms a matrix for 64 rows of the 11B's width on the
// 2-core AMX Xeon of bench/README.md, single-threaded).
MLLAMA_AVX512_TARGET inline void bf16_tile_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * x = dst->src[0];
    const int64_t K = x->ne[0], N = x->ne[1], padded = padded_rows(dst);
    const int64_t per_thread = (padded + nth - 1) / nth;
    const int64_t r0 = std::min(padded, per_thread * ith), r1 = std::min(padded, r0 + per_thread);
    for (int64_t r = r0; r < r1; ++r) {
        auto * out = reinterpret_cast<uint16_t *>(line_aligned<char>(dst->data) + r * dst->nb[1]);
        if (r >= N) {
            std::memset(out, 0, static_cast<size_t>(K) * sizeof(uint16_t));
            continue;
        }
        const auto * in = reinterpret_cast<const float *>(static_cast<const char *>(x->data) + r * x->nb[1]);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 live = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
            _mm256_mask_storeu_epi16(out + k, live, (__m256i) _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, in + k)));
        }
    }
}

// The product op: w by userdata, on the hardware tiles or the emulated ones.
template <class Decoder>
void product(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * w = static_cast<const ggml_tensor *>(userdata);
    if (amx_tiles_emulated()) product_on<amx::emulated_tiles, Decoder>(dst, ith, nth, w);
    else product_on<amx::hw_tiles, Decoder>(dst, ith, nth, w);
}

// w x^T -> [M, N] F32 on the tile unit: x [K, N] F32 rounded to BF16 and padded (bf16_tile_rows), then product
// with the weight type's decoder on ggml's threads; w goes in by userdata (ggml's repack buffer type accepts only
// mul_mat as a reader of its tensors).
template <class Decoder>
ggml_tensor * matmul_graph(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    const int64_t M = w->ne[1], N = x->ne[1];
    const int64_t padded = (N + amx::k_tile_rows - 1) / amx::k_tile_rows * amx::k_tile_rows;
    ggml_tensor * xb = ggml_custom_4d(ctx, GGML_TYPE_BF16, x->ne[0], padded + 1, 1, 1, &x, /*n_args=*/1,
                                      bf16_tile_rows, GGML_N_TASKS_MAX, nullptr);  // [K, padded + 1] BF16
    return ggml_custom_4d(ctx, GGML_TYPE_F32, M, N, 1, 1, &xb, /*n_args=*/1, product<Decoder>, GGML_N_TASKS_MAX,
                          w);  // [M, N]
}

}  // namespace mllama::qmm_tiles

#endif  // MLLAMA_X86_KERNELS
