// Q4_K matrices in ggml's repacked layout times F32 rows on AVX-512 VNNI CPUs (kernels/dispatch.h's q4k_matmul:
// decode batches and prefills, up to 64 rows per pass over the weights): the AVX2 form's arithmetic
// (kernels/x86/qmm_q4k_avx2.cpp, the same integer sums and the same float steps, so the two agree bit for bit)
// on 512-bit registers,
// where one zmm holds all 8 channels' 8 quant bytes of a repacked row. ggml's own product runs a batch of
// fewer than 4 rows as one pass over the weights per row, and reaches ~400 GFLOPS on 64 rows where this
// kernel reaches ~560-770 (figures in bench/README.md).
//
// Per block (8 channels x 256 weights), per 64-byte row of quants (sub-blocks 2c and 2c + 1, 8 weights of
// each per channel): the nibbles are masked out once for up to 4 activation rows (the high ones in place, as 16
// times their value, shifted down once per sub-block sum: one op less per 64 bytes; 4% less time at one row for the
// group alone on Zen 4, whole decode steps unchanged within noise); for each row vpdpbusd
// multiplies them by the row's 8 activations broadcast to every channel and sums four rows of quants (one
// 32-weight sub-block) in int32 lanes, two per channel (at most 16 * 15 * 127: exact in int16); vpackssdw
// packs the two sub-blocks' sums into int16 and one vpdpwssd applies both sub-blocks' scales into int32.
// The integer block sums are the AVX2 form's, so are the float steps after them. (The first version summed
// vpmaddubsw products with int16 adds and applied each sub-block's scales apart: 1.1-1.35x the time at 8-64
// rows; chunks of 6 or 8 rows instead of 4 took 1.2-3x the time at 8-64 rows.)
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/entry_points.h"
#include "kernels/x86/q4k_block.h"
#include "kernels/x86/q8k_avx2.h"

#include "ggml.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define MLLAMA_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace mllama {
namespace {

using q4k::block_mins;
using q4k::q4kx8_block;

constexpr int k_row_chunk = 4;  // activation rows per pass over a block's quants (their sums stay in registers)

// pshufb controls that spread the scales of a sub-block pair (2c, 2c + 1) over int16 lanes in the order of
// the packed sums (rows_block): int16 lane i of 128-bit lane L gets the scale of channel 2L + (i / 2) % 2, of
// sub-block 2c for i < 4 (`first`, from sub-block 2c's decoded bytes) and 2c + 1 for i >= 4 (`second`).
// decode_scales leaves channel ch's scale in byte ch (ch < 4) or ch + 4.
struct scale_control {
    alignas(64) int8_t first[64], second[64];
    scale_control() {
        for (int b = 0; b < 64; ++b) {
            const int lane = b / 16, i = (b % 16) / 2, channel = 2 * lane + (i / 2) % 2;
            const int8_t byte = static_cast<int8_t>(b % 2 ? -128 : (channel < 4 ? channel : channel + 4));
            first[b] = i < 4 ? byte : -128;
            second[b] = i < 4 ? -128 : byte;
        }
    }
};
const scale_control k_scale_control;

// What every row needs of one block: per sub-block pair c its scales as int16 lanes (scale_control), and the
// mins and fp16 factors.
struct block_factors {
    __m512i scale_pairs[4];
    block_mins mins;
};

// q4k::decode_scales for four sub-blocks per zmm: z[h] lane i holds sub-block 4h + i as
// [scale ch0-3, min ch0-3, scale ch4-7, min ch4-7] (the same steps per 128-bit lane).
MLLAMA_VNNI_TARGET inline void decode_scales4(const uint8_t * packed, __m512i z[2]) {
    const __m512i m6 = _mm512_set1_epi8(63), m4 = _mm512_set1_epi8(15), top2 = _mm512_set1_epi8(static_cast<char>(0xC0));
    const __m512i low_half = _mm512_broadcast_i32x4(_mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0));
    const __m512i nibbles = _mm512_broadcast_i32x4(
        _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, 8, 9, 10, 11, 8, 9, 10, 11));
    const __m512i to_high = _mm512_broadcast_i32x4(
        _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, 0, 1, 2, 3, 4, 5, 6, 7));
    // lane i <- the 12 bytes of sub-block i (dwords 3i..3i+2 of the 48) and one unused dword
    const __m512i spread = _mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0);
    for (int h = 0; h < 2; ++h) {  // 64 bytes from 48 h: within the block (its quants follow the scales)
        const __m512i b = _mm512_permutexvar_epi32(spread, _mm512_loadu_si512(packed + 48 * h));
        const __m512i low6 = _mm512_and_si512(_mm512_and_si512(b, m6), low_half);                                // ch0-3
        const __m512i high2 = _mm512_shuffle_epi8(_mm512_srli_epi16(_mm512_and_si512(b, top2), 2), to_high);  // bits 4-5
        const __m512i n = _mm512_shuffle_epi8(b, nibbles);  // bytes 8-11 twice: scales' low nibbles, mins' high ones
        const __m512i n4 = _mm512_mask_blend_epi32(0x5555, _mm512_and_si512(_mm512_srli_epi16(n, 4), m4),
                                                   _mm512_and_si512(n, m4));
        z[h] = _mm512_or_si512(low6, _mm512_or_si512(high2, _mm512_andnot_si512(low_half, n4)));
    }
}

MLLAMA_VNNI_TARGET inline void factors(const q4kx8_block & blk, block_factors & f) {
    __m512i z[2];
    decode_scales4(blk.scales, z);
    const __m512i first = _mm512_load_si512(k_scale_control.first), second = _mm512_load_si512(k_scale_control.second);
    const __m512i lanes[8] = {  // sub-block s in every 128-bit lane
        _mm512_shuffle_i32x4(z[0], z[0], 0x00), _mm512_shuffle_i32x4(z[0], z[0], 0x55),
        _mm512_shuffle_i32x4(z[0], z[0], 0xAA), _mm512_shuffle_i32x4(z[0], z[0], 0xFF),
        _mm512_shuffle_i32x4(z[1], z[1], 0x00), _mm512_shuffle_i32x4(z[1], z[1], 0x55),
        _mm512_shuffle_i32x4(z[1], z[1], 0xAA), _mm512_shuffle_i32x4(z[1], z[1], 0xFF)};
    __m128i sub[8];
    for (int s = 0; s < 8; ++s) sub[s] = _mm512_castsi512_si128(lanes[s]);
    for (int c = 0; c < 4; ++c) {
        f.scale_pairs[c] = _mm512_or_si512(_mm512_shuffle_epi8(lanes[2 * c], first),
                                           _mm512_shuffle_epi8(lanes[2 * c + 1], second));
    }
    q4k::mins_of(blk, sub, f.mins);
}

// acc[r] += the block's 8 channel results with rows x[r] (their block b), r < R. Row i = 4c + k of the quants (64 bytes,
// 8 per channel in channel order) holds weights 64c + 8k + 0..7 in the low nibbles (sub-block 2c) and
// 64c + 32 + 8k + 0..7 in the high ones (sub-block 2c + 1).
template <int R>
MLLAMA_VNNI_TARGET inline void rows_block(const q4kx8_block & blk, const block_factors & f, const q8k_block * const * x,
                                          const float * const * d, int64_t b, __m256 * acc) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512i isum[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        __m512i lo[R], hi[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
            const __m512i q = _mm512_loadu_si512(blk.qs + 64 * (4 * c + k));
            const __m512i q_lo = _mm512_and_si512(q, m4), q_hi = _mm512_andnot_si512(m4, q);  // 16 x the high nibbles
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {  // int32 lanes 2j, 2j + 1: channel j's bytes 0-3 and 4-7 of each k
                int64_t xl, xh;
                std::memcpy(&xl, x[r][b].qs + 64 * c + 8 * k, 8);
                std::memcpy(&xh, x[r][b].qs + 64 * c + 32 + 8 * k, 8);
                lo[r] = _mm512_dpbusd_epi32(lo[r], q_lo, _mm512_set1_epi64(xl));
                hi[r] = _mm512_dpbusd_epi32(hi[r], q_hi, _mm512_set1_epi64(xh));
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {  // exact in int16: 16 products of at most 15 * 127 (saturation never acts)
            const __m512i packed = _mm512_packs_epi32(lo[r], _mm512_srai_epi32(hi[r], 4));  // per 128-bit lane: lo ch 2L, 2L+1, hi ...
            isum[r] = _mm512_dpwssd_epi32(isum[r], packed, f.scale_pairs[c]);
        }
    }
    // int32 lanes of 128-bit lane L: [sub-block 2c of ch 2L, of ch 2L + 1, 2c + 1 of ch 2L, of ch 2L + 1]
    const __m512i natural = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 0, 0, 0, 0, 0, 0, 0, 0);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        const __m512i both = _mm512_add_epi32(isum[r], _mm512_shuffle_epi32(isum[r], _MM_PERM_BADC));
        const __m256i sums = _mm512_castsi512_si256(_mm512_permutexvar_epi32(natural, both));  // channels 0..7
        acc[r] = q4k::finish_row(sums, f.mins, x[r][b], d[r][b], acc[r]);
    }
}

// Rows x[0..n) (n <= k_row_chunk) of block b.
MLLAMA_VNNI_TARGET inline void chunk_block(int64_t n, const q4kx8_block & blk, const block_factors & f,
                                           const q8k_block * const * x, const float * const * d, int64_t b,
                                           __m256 * acc) {
    switch (n) {
        case 1: return rows_block<1>(blk, f, x, d, b, acc);
        case 2: return rows_block<2>(blk, f, x, d, b, acc);
        case 3: return rows_block<3>(blk, f, x, d, b, acc);
        default: return rows_block<4>(blk, f, x, d, b, acc);
    }
}

// One group of 8 channels against N rows (q4k::group_fn), k_row_chunk rows per pass over each block; the weights
// prefetched into L2, and into L1 too where L1 (weights_prefetch_l1(N)).
template <bool L1>
MLLAMA_VNNI_TARGET void group(const q4kx8_block * w, int64_t n_blocks, const q8k_block * const * x,
                              const float * const * d, int64_t N, float * out) {
    block_factors f;
    __m256 acc[k_q4k_max_rows];
    for (int64_t r = 0; r < N; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        if constexpr (L1) q4k::prefetch_ahead(w[b]);
        else q4k::prefetch_ahead_l2(w[b]);
        factors(w[b], f);
        for (int64_t r = 0; r < N; r += k_row_chunk) {
            chunk_block(std::min<int64_t>(k_row_chunk, N - r), w[b], f, x + r, d + r, b, acc + r);
        }
    }
    for (int64_t r = 0; r < N; ++r) _mm256_storeu_ps(out + q4k::k_interleave * r, acc[r]);
}

// userdata: W [K, M] in the repacked layout.
template <bool L1>
void product(ggml_tensor * dst, int ith, int nth, void * userdata) {
    q4k::for_each_group(static_cast<const ggml_tensor *>(userdata), dst, ith, nth, group<L1>, k_q4k_max_rows);
}

}  // namespace

ggml_tensor * q4k_matmul_avx512(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    return q4k::matmul_graph(ctx, w, x, weights_prefetch_l1(x->ne[1]) ? product<true> : product<false>);  // [M, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
