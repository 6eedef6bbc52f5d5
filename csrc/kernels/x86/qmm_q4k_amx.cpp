// Q4_K matrices in ggml's repacked layout times many F32 rows on Intel AMX tiles (kernels/dispatch.h's
// q4k_matmul_tiles: the text layers' prefill on CPUs with AMX-BF16). ggml's own AMX path multiplies Q4_K in
// int8 tiles, but in ggml's AMX buffer type only, which libggml-python's native build runs into SIGILL
// (bench/README.md, "Second AMX session"); its repacked product and our VNNI kernel (qmm_q4k_avx512.cpp) use
// the vector units only.
//
// The passes over the rows and the tiles: kernels/x86/qmm_tiles.h. Here, the decoding of a unit's weights: its
// two repacked groups (8 channels each) into B tiles, decoded as ggml decodes them (d * scale * q - dmin * min in
// F32) and rounded to nearest even, as kernels/x86/dequant_bf16.cpp does. Each product term carries two BF16
// roundings (weight and activation, 2^-9 each, relative): |error| <= 2^-8 sum |w x|, against ggml's Q8_K
// activations (1/254 of a block's largest, absolute) in its product.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/q4k_block.h"
#include "kernels/x86/qmm_tiles.h"
#include "kernels/x86/simd_math.h"

#include "ggml.h"

#include <cstdint>

namespace mllama {
namespace {

using q4k::q4kx8_block;

using namespace qmm_tiles;

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

// A unit's B tiles of blocks b0..b0 + nb - 1 (qmm_tiles.h's Decoder), a step at a time: step (c, kq, half) of a
// block decodes tile rows 4 kq + 2 half, + 1 of sub-blocks 2 c (low nibbles) and 2 c + 1 (high ones) from quant
// row 4 c + kq, the block's factors first.
class q4k_decoder {
  public:
    q4k_decoder(const ggml_tensor * w, int64_t unit, int64_t b0, int64_t nb, uint8_t * panel)
        : g0_(static_cast<const q4kx8_block *>(w->data) + (2 * unit * (w->ne[0] / k_block) + b0)),  // group 2 unit
          g1_(g0_ + w->ne[0] / k_block), panel_(panel), n_steps_(nb * k_steps_per_block) {}

    MLLAMA_AVX512_TARGET void step() {
        if (done_ == n_steps_) return;
        const int64_t b = done_ / k_steps_per_block;
        const int q = static_cast<int>(done_ % k_steps_per_block), c = q / 8, kq = q % 8 / 2, half = q % 2;
        if (q == 0) factors_of(g0_[b], 0, f_), factors_of(g1_[b], 1, f_);
        decode_rows(g0_[b], g1_[b], c, kq, half, panel_ + b * k_tiles_per_block * k_tile_bytes);
        ++done_;
    }
    MLLAMA_AVX512_TARGET void finish() {
        while (done_ < n_steps_) step();
    }

  private:
    static constexpr int64_t k_steps_per_block = k_tiles_per_block * k_steps_per_tile;
    static_assert(k_steps_per_block == 4 * 4 * 2, "steps: 4 sub-block pairs x 4 quant rows x 2 halves");

    // Tile rows 4 kq + 2 half, + 1 of sub-blocks 2 c and 2 c + 1 of a block -> its tiles at panel.
    MLLAMA_AVX512_TARGET void decode_rows(const q4kx8_block & g0, const q4kx8_block & g1, int c, int kq, int half,
                                          uint8_t * panel) const {
        // quant row 4c + kq: weights 8 kq..8 kq + 7 of each sub-block; this half's two tile rows' bytes
        const __m512i r0 = _mm512_loadu_si512(g0.qs + 64 * (4 * c + kq));
        const __m512i r1 = _mm512_loadu_si512(g1.qs + 64 * (4 * c + kq));
        const __m512i pairs = _mm512_permutex2var_epi16(
            r0, _mm512_load_si512(half ? k_pair_control.second : k_pair_control.first), r1);
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        const __m512i lo = _mm512_and_si512(pairs, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(pairs, 4), m4);
        uint8_t * even = panel + 2 * c * k_tile_bytes + (4 * kq + 2 * half) * amx::k_tile_bytes;  // row p
        uint8_t * odd = even + k_tile_bytes;  // the same row of sub-block 2c + 1's tile
        tile_row(_mm512_castsi512_si256(lo), f_, 2 * c, even);
        tile_row(_mm512_extracti64x4_epi64(lo, 1), f_, 2 * c, even + amx::k_tile_bytes);
        tile_row(_mm512_castsi512_si256(hi), f_, 2 * c + 1, odd);
        tile_row(_mm512_extracti64x4_epi64(hi, 1), f_, 2 * c + 1, odd + amx::k_tile_bytes);
    }

    const q4kx8_block * g0_, * g1_;
    uint8_t * panel_;
    int64_t n_steps_, done_ = 0;
    pair_factors f_;
};

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
    return qmm_tiles::matmul_graph<q4k_decoder>(ctx, w, x);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
