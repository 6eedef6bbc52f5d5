// Q4_K matrices in ggml's repacked layout times many F32 rows on Intel AMX tiles (kernels/dispatch.h's
// q4k_matmul_tiles: the text layers' prefill on CPUs with AMX-BF16). ggml's own AMX path multiplies Q4_K in
// int8 tiles, but in ggml's AMX buffer type only, which libggml-python's native build runs into SIGILL
// (bench/README.md, "Second AMX session"); its repacked product and our VNNI kernel (qmm_q4k_avx512.cpp) use
// the vector units only.
//
// Output channels go in units of 16 (two repacked groups: the columns of a B tile), split across threads.
// A unit's weights are decoded once per call into B tiles, one per 32-weight sub-block: tile row p
// holds the pair (2p, 2p + 1) of the sub-block's weights of all 16 channels as BF16, decoded as ggml decodes
// them (d * scale * q - dmin * min in F32) and rounded to nearest even, as kernels/x86/dequant_bf16.cpp does.
// The rows, rounded to BF16 once per call (zero rows up to a multiple of 16), pass 64 at a time: four C tiles
// (16 rows x 16 channels, F32) accumulate over a slab of the k range, B in tile 7, A in tiles 4 and 5; slabs keep
// the rows' part in L2 across a thread's units, and C goes back to dst between them. The next unit's tiles are
// decoded during a unit's first pass, a step between each sub-block's products: the vector units decode while
// the tile unit multiplies (64 rows of [4096 -> 14336] on the 2-core AMX Xeon of bench/README.md, 12 runs taking
// turns: least 9.3 ms against 11.5 decoding first, first quartile 10.6 against 12.3; 32 rows: 6.3 against 7.8,
// our VNNI kernel 6.6; 256 rows: no change). Each product
// term carries two BF16 roundings (weight and activation, 2^-9 each, relative): |error| <= 2^-8 sum |w x|,
// against ggml's Q8_K activations (1/254 of a block's largest, absolute) in its product.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/entry_points.h"
#include "kernels/x86/q4k_block.h"
#include "kernels/x86/simd_math.h"

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mllama {
namespace {

using q4k::q4kx8_block;

constexpr int64_t k_unit = 16;      // output channels per pass: the 16 columns of a B tile
constexpr int64_t k_sub = 32;       // weights per sub-block: the 32 BF16 of an A tile row
constexpr int64_t k_row_tiles = 4;  // C tiles: rows per pass over a unit's panel = 64
constexpr int64_t k_tile_bytes = amx::k_tile_rows * amx::k_tile_bytes;  // 1 KiB
// BF16 rows per slab of the k range: they stay in L2 (2 MiB a core on Sapphire Rapids) next to a unit's B tiles
// of the slab while every unit of a thread passes over them. An estimate, to be tuned on an AMX machine.
#ifndef MLLAMA_AMX_Q4K_SLAB_BYTES
#define MLLAMA_AMX_Q4K_SLAB_BYTES (256 << 10)
#endif
constexpr int64_t k_slab_bytes = MLLAMA_AMX_Q4K_SLAB_BYTES;

// vpermt2w control: from two groups' 64-byte rows of quants (unit 4 ch + jp: bytes 2 jp, 2 jp + 1 of channel
// ch), unit 16 jp + j of the result (j < 8: the first group's channel j, else the second's channel j - 8),
// jp = 0, 1 in `first`, 2, 3 in `second`: two tile rows' quant bytes per zmm, channels in tile column order.
struct pair_control {
    alignas(64) uint16_t first[32], second[32];
    pair_control() {
        for (int o = 0; o < 32; ++o) {
            const int j = o % 16;
            for (int half = 0; half < 2; ++half) {
                const int jp = o / 16 + 2 * half;
                const uint16_t unit = static_cast<uint16_t>(j < 8 ? 4 * j + jp : 32 + 4 * (j - 8) + jp);
                (half ? second : first)[o] = unit;
            }
        }
    }
};
const pair_control k_pair_control;

// A block pair's float factors: sub-block s, half h (channels 8h..8h+7, of group h), lane 2i and 2i + 1: channel
// 8h + i's d * scale and dmin * min (the two weights of a pair share them).
struct pair_factors {
    __m512 scale[8][2], min[8][2];
};

// 8 fp16 -> lanes 2i, 2i + 1 (pairs: the lane control)
MLLAMA_AVX512_TARGET inline __m512 fp16_pairs(const uint16_t * h, __m512i pairs) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(h)));
    return _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(v));
}

MLLAMA_AVX512_TARGET void factors_of(const q4kx8_block & blk, int h, pair_factors & f) {
    __m128i sub[8];
    q4k::decode_scales(blk.scales, sub);  // sub[s]: [scale ch0-3, min ch0-3, scale ch4-7, min ch4-7]
    // lane 2i, 2i + 1 <- byte of channel i: scales at i (i < 4) or i + 4, mins 4 further
    const __m128i scales = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 8, 8, 9, 9, 10, 10, 11, 11);
    const __m128i mins = _mm_add_epi8(scales, _mm_set1_epi8(4));
    const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512 d = fp16_pairs(blk.d, pairs), dmin = fp16_pairs(blk.dmin, pairs);
    for (int s = 0; s < 8; ++s) {
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(sub[s], scales)));
        const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(sub[s], mins)));
        f.scale[s][h] = _mm512_mul_ps(d, sc);
        f.min[s][h] = _mm512_mul_ps(dmin, m);
    }
}

// One tile row from 32 quant bytes (channel j's pair at bytes 2j, 2j + 1, j < 16): 64 bytes of BF16 pairs.
MLLAMA_AVX512_TARGET inline void tile_row(__m256i q, const pair_factors & f, int s, uint8_t * out) {
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));    // channels 0-7
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));  // channels 8-15
    const __m512 lo = _mm512_fmsub_ps(q0, f.scale[s][0], f.min[s][0]);
    const __m512 hi = _mm512_fmsub_ps(q1, f.scale[s][1], f.min[s][1]);
    _mm512_storeu_si512(out, (__m512i) _mm512_cvtne2ps_pbh(hi, lo));
}

// A unit's B tiles of one slab, decoded a step at a time: each step decodes half of a sub-block pair's two tiles
// (quant rows 4 c + 2 h, + 1 of block b: tile rows 8 h..8 h + 7 of sub-blocks 2 c and 2 c + 1), the block's
// factors first; 8 steps a block, as many as the slab has tiles. The row pass of the unit before runs the steps
// between its tile products (row_pass), so that the vector units decode while the tile unit multiplies.
class slab_decoder {
  public:
    // g0, g1: the unit's two groups' first blocks of the slab (nb blocks); panel: where its tiles go
    slab_decoder(const q4kx8_block * g0, const q4kx8_block * g1, int64_t nb, uint8_t * panel)
        : g0_(g0), g1_(g1), panel_(panel), n_steps_(nb * k_steps_per_block) {}

    MLLAMA_AVX512_TARGET void step() {
        if (done_ == n_steps_) return;
        const int64_t b = done_ / k_steps_per_block;
        const int c = static_cast<int>(done_ % k_steps_per_block) / 2, h = static_cast<int>(done_ % 2);
        if (c == 0 && h == 0) factors_of(g0_[b], 0, f_), factors_of(g1_[b], 1, f_);
        decode_half(g0_[b], g1_[b], c, h, panel_ + b * k_steps_per_block * k_tile_bytes);
        ++done_;
    }
    MLLAMA_AVX512_TARGET void finish() {
        while (done_ < n_steps_) step();
    }

  private:
    static constexpr int64_t k_steps_per_block = q4k::k_block / k_sub;

    // tile rows 8 h..8 h + 7 of sub-blocks 2 c (low nibbles) and 2 c + 1 (high ones) of a block -> its tiles at panel
    MLLAMA_AVX512_TARGET void decode_half(const q4kx8_block & g0, const q4kx8_block & g1, int c, int h,
                                          uint8_t * panel) const {
        const __m512i first = _mm512_load_si512(k_pair_control.first);
        const __m512i second = _mm512_load_si512(k_pair_control.second);
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        for (int kq = 2 * h; kq < 2 * h + 2; ++kq) {  // quant row 4c + kq: weights 8 kq..8 kq + 7 of each sub-block
            const __m512i r0 = _mm512_loadu_si512(g0.qs + 64 * (4 * c + kq));
            const __m512i r1 = _mm512_loadu_si512(g1.qs + 64 * (4 * c + kq));
            const __m512i pairs[2] = {_mm512_permutex2var_epi16(r0, first, r1),
                                      _mm512_permutex2var_epi16(r0, second, r1)};
            for (int half = 0; half < 2; ++half) {  // tile rows 4 kq + 2 half, + 1
                const __m512i lo = _mm512_and_si512(pairs[half], m4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(pairs[half], 4), m4);
                uint8_t * even = panel + 2 * c * k_tile_bytes + (4 * kq + 2 * half) * amx::k_tile_bytes;  // row p
                uint8_t * odd = even + k_tile_bytes;  // the same row of sub-block 2c + 1's tile
                tile_row(_mm512_castsi512_si256(lo), f_, 2 * c, even);
                tile_row(_mm512_extracti64x4_epi64(lo, 1), f_, 2 * c, even + amx::k_tile_bytes);
                tile_row(_mm512_castsi512_si256(hi), f_, 2 * c + 1, odd);
                tile_row(_mm512_extracti64x4_epi64(hi, 1), f_, 2 * c + 1, odd + amx::k_tile_bytes);
            }
        }
    }

    const q4kx8_block * g0_, * g1_;
    uint8_t * panel_;
    int64_t n_steps_, done_ = 0;
    pair_factors f_;
};

// Where C tile i of a row pass lives between slabs: its 16 rows of dst (channels c0..c0 + 15), or, for a tile
// that runs past the last row, the unit's 16 x 16 floats in a side buffer.
struct c_home {
    uint8_t * p;
    size_t stride;
};

// C(i) = tmm(i) (+)= A (tmm 4 + i % 2: rows 16 i.. of x) B (tmm 7) over n_tiles sub-blocks of the panel, i < NT;
// C starts at zero on the first slab, else from its home, and goes back there. next (or null): the next unit's
// decoder, one step after each tile step's products.
template <class Tiles, int NT>
MLLAMA_AMX_TARGET void row_pass(const uint8_t * panel, int64_t n_tiles, const uint8_t * x, size_t x_row, bool first,
                                const c_home * c, slab_decoder * next) {
    if (first) {
        Tiles::template zero<0>();
        if constexpr (NT > 1) Tiles::template zero<1>();
        if constexpr (NT > 2) Tiles::template zero<2>();
        if constexpr (NT > 3) Tiles::template zero<3>();
    } else {
        Tiles::template load<0>(c[0].p, c[0].stride);
        if constexpr (NT > 1) Tiles::template load<1>(c[1].p, c[1].stride);
        if constexpr (NT > 2) Tiles::template load<2>(c[2].p, c[2].stride);
        if constexpr (NT > 3) Tiles::template load<3>(c[3].p, c[3].stride);
    }
    const size_t a_stride = amx::k_tile_rows * x_row;
    for (int64_t t = 0; t < n_tiles; ++t) {
        const uint8_t * a = x + t * amx::k_tile_bytes;
        Tiles::template load<7>(panel + t * k_tile_bytes, amx::k_tile_bytes);
        Tiles::template load<4>(a, x_row);
        Tiles::template dot_bf16<0, 4, 7>();
        if constexpr (NT > 1) Tiles::template load<5>(a + a_stride, x_row), Tiles::template dot_bf16<1, 5, 7>();
        if constexpr (NT > 2) Tiles::template load<4>(a + 2 * a_stride, x_row), Tiles::template dot_bf16<2, 4, 7>();
        if constexpr (NT > 3) Tiles::template load<5>(a + 3 * a_stride, x_row), Tiles::template dot_bf16<3, 5, 7>();
        if (next) next->step();
    }
    Tiles::template store<0>(c[0].p, c[0].stride);
    if constexpr (NT > 1) Tiles::template store<1>(c[1].p, c[1].stride);
    if constexpr (NT > 2) Tiles::template store<2>(c[2].p, c[2].stride);
    if constexpr (NT > 3) Tiles::template store<3>(c[3].p, c[3].stride);
}

// One slab (sub-blocks t0.. of its panel, n_tiles of them) of a unit (channels c0..c0 + 15) for all rows, 64 at a
// time; tail: the unit's side buffer for the row tile past the last row. The first pass runs next's steps.
template <class Tiles>
MLLAMA_AMX_TARGET void unit_slab(const uint8_t * panel, int64_t t0, int64_t n_tiles, const ggml_tensor * xb,
                                 ggml_tensor * dst, int64_t c0, uint8_t * tail, slab_decoder * next) {
    const int64_t n_rows = dst->ne[1], padded = xb->ne[1];
    for (int64_t r0 = 0; r0 < padded; r0 += k_row_tiles * amx::k_tile_rows) {
        const uint8_t * x = static_cast<const uint8_t *>(xb->data) + r0 * xb->nb[1] + t0 * amx::k_tile_bytes;
        const int nt = static_cast<int>(std::min<int64_t>(k_row_tiles, (padded - r0) / amx::k_tile_rows));
        c_home c[k_row_tiles];
        for (int i = 0; i < nt; ++i) {
            const int64_t r = r0 + i * amx::k_tile_rows;
            c[i] = r + amx::k_tile_rows <= n_rows
                       ? c_home{static_cast<uint8_t *>(dst->data) + r * dst->nb[1] + c0 * sizeof(float), dst->nb[1]}
                       : c_home{tail, k_unit * sizeof(float)};
        }
        switch (nt) {
            case 1: row_pass<Tiles, 1>(panel, n_tiles, x, xb->nb[1], t0 == 0, c, next); break;
            case 2: row_pass<Tiles, 2>(panel, n_tiles, x, xb->nb[1], t0 == 0, c, next); break;
            case 3: row_pass<Tiles, 3>(panel, n_tiles, x, xb->nb[1], t0 == 0, c, next); break;
            default: row_pass<Tiles, 4>(panel, n_tiles, x, xb->nb[1], t0 == 0, c, next);
        }
        next = nullptr;
    }
}

// dst [M, N] = W x^T; dst->src[0] = x rounded to BF16, zero rows up to a multiple of 16; userdata = W [K, M] in the
// repacked layout.
// The k range goes in slabs whose BF16 rows (k_slab_bytes) stay in L2 while each of the thread's units multiplies
// its part of the slab, decoded into one of two panels during the unit before's first row pass; C accumulates in
// dst between slabs.
template <class Tiles>
MLLAMA_AMX_TARGET void product_on(ggml_tensor * dst, int ith, int nth, const ggml_tensor * w) {
    const ggml_tensor * xb = dst->src[0];
    const int64_t n_blocks = w->ne[0] / q4k::k_block, n_units = w->ne[1] / k_unit, padded = xb->ne[1];
    constexpr int64_t tiles_per_block = q4k::k_block / k_sub;
    const int64_t per_thread = (n_units + nth - 1) / nth;
    const int64_t u0 = std::min(n_units, per_thread * ith), u1 = std::min(n_units, u0 + per_thread);
    if (u0 >= u1) return;
    const int64_t row_block_bytes = padded * amx::k_tile_bytes * tiles_per_block;  // all rows, one block's k
    const int64_t slab_blocks = std::clamp<int64_t>(k_slab_bytes / row_block_bytes, 1, n_blocks);
    const size_t panel_bytes = static_cast<size_t>(slab_blocks * tiles_per_block * k_tile_bytes);
    static thread_local std::vector<uint8_t> panels, tails;  // two units' B tiles of a slab; the units' tail tiles
    panels.resize(2 * panel_bytes);
    tails.resize(static_cast<size_t>((u1 - u0) * amx::k_tile_rows * k_unit * sizeof(float)));
    amx::tile_scope<Tiles> scope(amx::k_full_tiles);
    const auto * blocks = static_cast<const q4kx8_block *>(w->data);
    // job j: unit u0 + j % n_mine of slab j / n_mine, its tiles in panel j % 2
    const int64_t n_mine = u1 - u0, n_jobs = (n_blocks + slab_blocks - 1) / slab_blocks * n_mine;
    auto decoder_of = [&](int64_t j) {
        const int64_t b0 = j / n_mine * slab_blocks, u = u0 + j % n_mine;
        const q4kx8_block * g0 = blocks + 2 * u * n_blocks + b0;  // groups 2u, 2u + 1
        return slab_decoder(g0, g0 + n_blocks, std::min(slab_blocks, n_blocks - b0), panels.data() + j % 2 * panel_bytes);
    };
    slab_decoder next = decoder_of(0);
    next.finish();
    for (int64_t j = 0; j < n_jobs; ++j) {
        const int64_t b0 = j / n_mine * slab_blocks, u = u0 + j % n_mine, nb = std::min(slab_blocks, n_blocks - b0);
        if (j + 1 < n_jobs) next = decoder_of(j + 1);
        unit_slab<Tiles>(panels.data() + j % 2 * panel_bytes, b0 * tiles_per_block, nb * tiles_per_block, xb, dst,
                         u * k_unit, tails.data() + (u - u0) * amx::k_tile_rows * k_unit * sizeof(float),
                         j + 1 < n_jobs ? &next : nullptr);
        next.finish();
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
// to padded (whole A tiles); threads split the rows. One op in place of ggml's pad and cast (the pad alone took
// ~0.75 ms a matrix for 64 rows of 4096 on the 2-core AMX Xeon of bench/README.md, single-threaded).
MLLAMA_AVX512_TARGET void bf16_tile_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * x = dst->src[0];
    const int64_t K = x->ne[0], N = x->ne[1], padded = dst->ne[1];
    const int64_t per_thread = (padded + nth - 1) / nth;
    const int64_t r0 = std::min(padded, per_thread * ith), r1 = std::min(padded, r0 + per_thread);
    for (int64_t r = r0; r < r1; ++r) {
        auto * out = reinterpret_cast<uint16_t *>(static_cast<char *>(dst->data) + r * dst->nb[1]);
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

void product(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * w = static_cast<const ggml_tensor *>(userdata);
    if (amx_tiles_emulated()) product_on<amx::emulated_tiles>(dst, ith, nth, w);
    else product_on<amx::hw_tiles>(dst, ith, nth, w);
}

}  // namespace

bool q4k_tiles_supported(const ggml_tensor * w, const ggml_tensor * x) {
    return cpu_kernel_available(cpu_kernel::amx) && w && x && w->type == GGML_TYPE_Q4_K && q4k::in_repack_buffer(w) &&
           ggml_type_size(GGML_TYPE_Q4_K) * q4k::k_interleave == sizeof(q4kx8_block) &&
           w->ne[0] % q4k::k_block == 0 && w->ne[0] > 0 && w->ne[1] % k_unit == 0 && w->ne[2] == 1 && w->ne[3] == 1 &&
           ggml_is_contiguous(w) && x->type == GGML_TYPE_F32 && x->ne[0] == w->ne[0] &&
           x->ne[1] >= k_q4k_tiles_min_rows && x->ne[2] == 1 && x->ne[3] == 1 && ggml_is_contiguous_rows(x) &&
           x->nb[0] == sizeof(float);
}

ggml_tensor * q4k_matmul_tiles(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    const int64_t M = w->ne[1], N = x->ne[1];
    const int64_t padded = (N + amx::k_tile_rows - 1) / amx::k_tile_rows * amx::k_tile_rows;
    ggml_tensor * xb = ggml_custom_4d(ctx, GGML_TYPE_BF16, x->ne[0], padded, 1, 1, &x, /*n_args=*/1, bf16_tile_rows,
                                      GGML_N_TASKS_MAX, nullptr);  // [K, padded] BF16
    // w goes in by userdata, as in q4k::matmul_graph (the repack buffer type accepts only mul_mat as its reader)
    return ggml_custom_4d(ctx, GGML_TYPE_F32, M, N, 1, 1, &xb, /*n_args=*/1, product, GGML_N_TASKS_MAX, w);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
