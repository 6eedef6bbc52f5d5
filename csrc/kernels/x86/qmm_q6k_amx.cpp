// Q6_K matrices in the file layout times many F32 rows on Intel AMX tiles (kernels/dispatch.h's q6k_matmul_tiles:
// prefill on CPUs with AMX-BF16). ggml repacks no Q6_K matrix, and the 11B's Q4_K_M files keep half of their
// ffn_down and attn_v matrices in Q6_K; our Q6_K kernel (qmm_q6k.cpp) multiplies them on the vector units.
//
// The passes over the rows and the tiles: kernels/x86/qmm_tiles.h. Here, the decoding of a unit's weights (16
// channels, each a row of blocks in the file) into B tiles: per 32-weight sub-block, each channel's weights as ggml
// decodes them (d * scale in F32, times q - 32) rounded to nearest even to BF16, as kernels/x86/dequant_bf16.cpp
// does, one zmm a channel (16 pairs), then transposed (16 x 16 pairs) so that tile row p holds pair p of every
// channel. Each product term carries two BF16 roundings (weight and activation, 2^-9 each, relative): |error| <=
// 2^-8 sum |w x|, against ggml's Q8_K activations (1/254 of a block's largest, absolute) in its product.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/q6k_block.h"
#include "kernels/x86/qmm_tiles.h"
#include "kernels/x86/simd_math.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdint>

namespace mllama {
namespace {

using q6k::q6k_block;
using namespace qmm_tiles;

static_assert(q6k::k_block == k_block, "Q6_K blocks of the tiles' block size");

// A unit's B tiles of blocks b0..b0 + nb - 1 (qmm_tiles.h's Decoder), a step at a time: step (s, g) of a block
// decodes channels 4 g..4 g + 3 of sub-block s (tile s) and transposes their group within lanes (the first half of
// simd::transpose16); the last group's step finishes the transpose and writes the tile. The block's scales come
// first, and each sub-block's first step prefetches two channels' block two ahead.
class q6k_decoder {
  public:
    q6k_decoder(const ggml_tensor * w, int64_t unit, int64_t b0, int64_t nb, uint8_t * panel)
        : first_(static_cast<const uint8_t *>(w->data) + unit * k_unit * w->nb[1] + b0 * sizeof(q6k_block)),
          row_bytes_(w->nb[1]), panel_(panel), n_blocks_(nb), n_steps_(nb * k_steps_per_block) {}

    MLLAMA_AVX512_TARGET void step() {
        if (done_ == n_steps_) return;
        const int64_t b = done_ / k_steps_per_block;
        const int q = static_cast<int>(done_ % k_steps_per_block), s = q / k_groups, g = q % k_groups;
        if (q == 0) scales_of(b);
        if (g == 0 && b + k_prefetch_blocks < n_blocks_) prefetch(b + k_prefetch_blocks, 2 * s);
        decode_group(b, s, g);
        if (g == k_groups - 1) write_tile(panel_ + (b * k_tiles_per_block + s) * k_tile_bytes);
        ++done_;
    }
    MLLAMA_AVX512_TARGET void finish() {
        while (done_ < n_steps_) step();
    }

  private:
    static constexpr int k_groups = 4;  // channels 4 g..4 g + 3: one step each
    static constexpr int64_t k_steps_per_block = k_tiles_per_block * k_steps_per_tile;
    static_assert(k_steps_per_tile == k_groups, "a step per group of four channels");
    // Blocks ahead that a step prefetches into L1: the unit's 16 rows are 16 streams through memory, too many for
    // the hardware's prefetchers to keep ahead (2 blocks: 16.1 against 16.7 ms for 64 rows of an 11B ffn_down; the
    // decoding alone, 6.4 against 7.5 ms, and 6.0 from the caches: the 2-core AMX Xeon of bench/README.md).
    static constexpr int64_t k_prefetch_blocks = 2;

    const q6k_block & block(int channel, int64_t b) const {
        return reinterpret_cast<const q6k_block *>(first_ + channel * row_bytes_)[b];
    }

    // channels c, c + 1's block b (210 bytes: four or five cache lines, from its first byte to its last)
    void prefetch(int64_t b, int c) const {
        for (int i = c; i < c + 2; ++i) {
            const auto * p = reinterpret_cast<const char *>(&block(i, b));
            for (size_t at = 0; at < sizeof(q6k_block); at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
            _mm_prefetch(p + sizeof(q6k_block) - 1, _MM_HINT_T0);
        }
    }

    // ds_[i][g] = d * scale g of channel i's block b, in F32 as ggml's dequantize_row_q6_K rounds it
    MLLAMA_AVX512_TARGET void scales_of(int64_t b) {
        for (int i = 0; i < k_unit; ++i) {
            const q6k_block & blk = block(i, b);
            const __m512 scales = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk.scales))));
            _mm512_storeu_ps(ds_[i], _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(blk.d)), scales));
        }
    }

    // Channels 4 g..4 g + 3 of sub-block s of block b (weights 32 s..: half h = s / 4, quarter j = s % 4, weight
    // 128 h + 32 j + l in ql byte 64 h + 32 (j & 1) + l, nibble j >> 1, and qh byte 32 h + l, bits 2 j..2 j + 1;
    // scales 8 h + 2 j + l / 16): each channel's 16 pairs as BF16, then their group transposed into u_.
    MLLAMA_AVX512_TARGET void decode_group(int64_t b, int s, int g) {
        const int h = s / 4, j = s % 4;
        const __m128i nibble_shift = _mm_cvtsi32_si128(4 * (j >> 1)), high_shift = _mm_cvtsi32_si128(2 * j);
        const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03), offset = _mm256_set1_epi8(32);
        __m512i rows[k_groups];
        for (int r = 0; r < k_groups; ++r) {
            const int i = 4 * g + r;
            const q6k_block & blk = block(i, b);
            const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.ql + 64 * h + 32 * (j & 1)));
            const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.qh + 32 * h));
            const __m256i low = _mm256_and_si256(_mm256_srl_epi16(ql, nibble_shift), m4);  // bits 0-3, per byte
            const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, high_shift), m2), 4);
            const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low, high), offset);  // q - 32 in [-32, 31]
            const float * ds = ds_[i] + 8 * h + 2 * j;
            const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))),
                                            _mm512_set1_ps(ds[0]));  // weights l = 0..15
            const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))),
                                            _mm512_set1_ps(ds[1]));  // l = 16..31
            rows[r] = (__m512i) _mm512_cvtne2ps_pbh(w1, w0);  // 16 pairs (2p, 2p + 1) of channel i
        }
        simd::transpose4_in_lanes(rows, u_ + 4 * g);
    }

    // u_ (the four groups) -> tile row p = pair p of the 16 channels, at out
    MLLAMA_AVX512_TARGET void write_tile(uint8_t * out) const {
        __m512i pairs[16];
        simd::lanes_to_columns(u_, pairs);
        for (int p = 0; p < amx::k_tile_rows; ++p) _mm512_storeu_si512(out + p * amx::k_tile_bytes, pairs[p]);
    }

    const uint8_t * first_;  // the unit's first channel's block b0
    size_t row_bytes_;
    uint8_t * panel_;
    int64_t n_blocks_, n_steps_, done_ = 0;
    alignas(64) float ds_[k_unit][16];
    __m512i u_[16];  // the tile's groups, transposed within lanes (simd::transpose4_in_lanes)
};

}  // namespace

bool q6k_tiles_supported(const ggml_tensor * w, const ggml_tensor * x) {
    return cpu_kernel_available(cpu_kernel::amx) && w && x && w->type == GGML_TYPE_Q6_K &&
           ggml_type_size(GGML_TYPE_Q6_K) == sizeof(q6k_block) && ggml_blck_size(GGML_TYPE_Q6_K) == k_block &&
           w->ne[0] % k_block == 0 && w->ne[0] > 0 && w->ne[1] % k_unit == 0 && w->ne[2] == 1 && w->ne[3] == 1 &&
           ggml_is_contiguous(w) && w->extra == nullptr && (!w->buffer || ggml_backend_buffer_is_host(w->buffer)) &&
           x->type == GGML_TYPE_F32 && x->ne[0] == w->ne[0] && x->ne[1] >= k_q6k_tiles_min_rows && x->ne[2] == 1 &&
           x->ne[3] == 1 && ggml_is_contiguous_rows(x) && x->nb[0] == sizeof(float);
}

ggml_tensor * q6k_matmul_tiles(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return qmm_tiles::matmul_graph<q6k_decoder>(ctx, w, x);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
