// What the two BF16 vision attention paths share (kernels/x86/attn_bf16.cpp: AVX-512 BF16 dot
// products; kernels/x86/attn_amx.cpp: AMX tiles): sizes, the packed K and V layouts, the per-tile
// softmax state and the masked online softmax of one row over 64 keys.
//
//   Kp[h][j/16][d/2][j%16] = (K[h][j][d], K[h][j][d+1])      16 keys x one d pair per 64 bytes
//   Vp[h][j/2][d]          = (V[h][j][d], V[h][j+1][d])      16 channels x one key pair per 64 bytes
// A 16-key block of Kp is an AMX B tile for Q K^T (d pairs as rows), 16 key pairs of Vp one for P V.
// Keys are padded to a multiple of 64 (masked), channels with zeros (dims::Dv, dims::Pk). Both start at a cache-line
// boundary of their tensors (packed_rows), so that no tile row or zmm of them straddles two lines.
#pragma once

#include "kernels/x86/attn_mask.h"
#include "kernels/x86/cache_lines.h"
#include "kernels/x86/simd_math.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mllama::attn {

constexpr int64_t k_key_block = 64;     // keys per micro step (4 zmm of scores per query row)
constexpr int64_t k_rows = 4;           // query rows per micro step
constexpr int64_t k_query_tile = 64;    // query rows sharing one pass over a key chunk
// keys kept hot in L2 while a query tile walks them: 256 (80 KiB of K and V at D = 80) took 3-4% less
// time than 1024 or 512 on Zen 4 (bench/README.md)
constexpr int64_t k_key_chunk = 256;

struct dims {
    int64_t D, H, N;  // head size, heads, tokens
    int64_t Dv;       // D rounded up to 16 (channel groups of a zmm): V's channels
    int64_t Np;       // N rounded up to k_key_block
    int64_t Pk;       // channel pairs of Q and K: Dv / 2, or D rounded up to 32 / 2 for AMX tiles (16 pairs a row)
    int64_t groups() const { return Dv / 16; }
};

// tiles: the AMX layout of Q and K (their channel pairs padded to whole tile rows).
inline dims dims_of(const ggml_tensor * q, bool tiles) {
    dims d{q->ne[0], q->ne[1], q->ne[2], 0, 0, 0};
    d.Dv = (d.D + 15) / 16 * 16;
    d.Np = (d.N + k_key_block - 1) / k_key_block * k_key_block;
    d.Pk = tiles ? (d.D + 31) / 32 * 16 : d.Dv / 2;
    return d;
}

inline uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline uint32_t bf16_pair(float lo, float hi) { return to_bf16(lo) | (static_cast<uint32_t>(to_bf16(hi)) << 16); }

inline float elem(const ggml_tensor * t, int64_t d, int64_t h, int64_t j) {  // t: [D, H, N] F32
    return *reinterpret_cast<const float *>(static_cast<const char *>(t->data) + d * t->nb[0] + h * t->nb[1] + j * t->nb[2]);
}

// Running softmax state and output accumulator of one query tile.
struct tile_state {
    line_vector<uint32_t> q;   // [k_query_tile][Pk] scaled query, BF16 pairs
    std::vector<float> m;      // running max per row
    line_vector<float> l;      // [k_query_tile][16] running sum per row, one partial sum per lane
    line_vector<float> o;      // [k_query_tile][Dv] unnormalized output
};

// Where the packed Kp or Vp of a tensor made by bf16_attention_avx512 begins: its tensor holds k_cache_line bytes
// more than the layout, which starts at the first line boundary.
inline const uint32_t * packed_rows(const ggml_tensor * t) { return line_aligned<uint32_t>(t->data); }
inline uint32_t * packed_rows(ggml_tensor * t) { return line_aligned<uint32_t>(t->data); }

struct job {
    dims d;
    int64_t h, i0;             // head, first query row of the tile
    const uint32_t * kp;       // this head's packed keys
    const uint32_t * vp;       // this head's packed values
    const ggml_tensor * mask;  // [N, N] F16
    mask_view masks;           // its zero rows and hidden key blocks (attn_mask.h)

    // Whether rows r0..r0+n-1 of the tile all have a mask / any has one (padding rows reuse the last mask row).
    bool rows_all_masked(int64_t r0, int64_t n) const { return masks.all_masked(i0 + r0, n); }
    bool rows_masked(int64_t r0, int64_t n) const { return masks.any_masked(i0 + r0, n); }
};

// log2(e): the scores are kept in base 2 (start_tile scales the queries by log2(e) / sqrt(D)), so the
// softmax takes 2^x, one multiply fewer than e^x.
constexpr float k_log2e = 1.44269504088896341f;

// How far a row's scores may rise above its running maximum before the maximum is moved: up to 2^8,
// a probability stays far from F32 and BF16 overflow, and most blocks skip the row maximum altogether.
constexpr float k_max_drift = 8.0f;

// The factor on the queries: 1 / sqrt(D) for the softmax, log2(e) for base 2.
inline float query_scale(int64_t D) { return k_log2e / std::sqrt(static_cast<float>(D)); }

// The lanes of keys k0..k0+15 that are keys (below N); the others are padding.
inline __mmask16 key_lanes(const job & j, int64_t k0) {
    return static_cast<__mmask16>((1u << std::clamp<int64_t>(j.d.N - k0, 0, 16)) - 1u);
}

// Adds the mask row of query i (keys jb..jb+63; natural-log units, so times log2(e)) and -inf for
// padding keys.
MLLAMA_AVX512_TARGET inline void add_mask(const job & j, int64_t i, int64_t jb, __m512 s[4]) {
    const auto * row = reinterpret_cast<const uint16_t *>(static_cast<const char *>(j.mask->data) + i * j.mask->nb[1]);
    for (int t = 0; t < 4; ++t) {
        const int64_t k0 = jb + 16 * t;
        const __mmask16 live = key_lanes(j, k0);
        const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, row + k0));
        s[t] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), live,
                                  _mm512_fmadd_ps(m, _mm512_set1_ps(k_log2e), s[t]));
    }
}

// -inf for the padding keys (past N) of keys jb..jb+63.
MLLAMA_AVX512_TARGET inline void hide_padding_keys(const job & j, int64_t jb, __m512 s[4]) {
    const __m512 hidden = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int t = 0; t < 4; ++t) s[t] = _mm512_mask_mov_ps(hidden, key_lanes(j, jb + 16 * t), s[t]);
}

// The mask of query row i (padding rows: N - 1) on its scores over keys jb..jb+63, where some row of the step has
// one (rows_masked): its mask row added unless the row is all zeros, and -inf for padding keys. A row of zeros is
// not read: the tower's rows are, all but its padding patches', and reading one row of the [N, N] mask per query
// row and head for the last key block (its padding keys) missed the cache each time.
MLLAMA_AVX512_TARGET inline void mask_scores(const job & j, int64_t i, int64_t jb, bool rows_masked, __m512 s[4]) {
    if (rows_masked && !j.masks.zero_rows[i]) add_mask(j, i, jb, s);
    else if (jb + k_key_block > j.d.N) hide_padding_keys(j, jb, s);
}

// 2^x for x <= k_max_drift as the softmax needs it: the result is rounded to BF16 (relative step
// 2^-9), so a degree-4 polynomial for 2^f on [0, 1) (relative error 2.7e-6, fitted to the relative error) is
// enough, f = x - floor(x) in one vreduceps and the power of two by vscalefps, which floors x itself (against
// rounding x to the nearest integer, subtracting it and scaling by it: 3-4% less time for the tile attention,
// tests/c/attn_bf16.cpp with the 4-tile image's mask, 2026-12-06); below -125 it returns 2^-125 (~2e-38), which
// is 0 for every sum it enters (the row maximum contributes 1 or more), and -inf (a masked key) gives it too.
// Never a subnormal: an F32 operation that gives or takes one costs a microcode assist on Intel cores, and with
// 2^-127 for every masked key the attention ran 1.8-3x slower on an AMX Xeon (tests/c/attn_bf16.cpp's
// ATTN_FP_FLAGS checks it on any x86 CPU).
MLLAMA_AVX512_TARGET inline __m512 exp2_softmax(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x), in [0, 1)
    __m512 p = _mm512_set1_ps(0.013534121215343475f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.052011482417583466f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24144279956817627f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6930038332939148f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000026226043701f));
    return _mm512_scalef_ps(p, x);  // p 2^floor(x)
}

// Softmax step of one row over 16 NV base-2 scores (64 on the AVX-512 path, up to a key chunk on AMX
// tiles): updates the running max m and per-lane sums l, writes the BF16 probabilities, returns the
// factor that rescales the row's earlier output. The maximum moves only when a score passes
// m + k_max_drift (always on the first live block), so a probability is at most 2^k_max_drift and
// most blocks need no horizontal maximum: the test is one comparison of the scores' lane maxima (four chains
// of vmaxps) with m + k_max_drift, where a comparison per register and an OR of the masks took 1-8% more time
// (median ~2.5%, 5 rounds) for the tile attention (tests/c/attn_bf16.cpp with the 4-tile image's mask, 2026-12-06).
template <int NV>
MLLAMA_AVX512_TARGET inline float softmax_row(__m512 (&s)[NV], float & m, float * l, uint16_t * probs) {
    static_assert(NV % 4 == 0, "four chains of maxima");
    __m512 tops[4] = {s[0], s[1], s[2], s[3]};
    for (int t = 4; t < NV; ++t) tops[t % 4] = _mm512_max_ps(tops[t % 4], s[t]);
    const __m512 top = _mm512_max_ps(_mm512_max_ps(tops[0], tops[1]), _mm512_max_ps(tops[2], tops[3]));
    const __mmask16 over = _mm512_cmp_ps_mask(top, _mm512_set1_ps(m + k_max_drift), _CMP_GT_OQ);
    float alpha = 1.0f;
    if (over) {
        const float m_new = _mm512_reduce_max_ps(top);  // > m
        alpha = std::exp2(m - m_new);  // 0 on the first live block (m = -inf)
        m = m_new;
    } else if (m == -std::numeric_limits<float>::infinity()) {  // everything masked so far
        std::memset(probs, 0, NV * 16 * sizeof(uint16_t));
        return 1.0f;
    }
    const __m512 shift = _mm512_set1_ps(m);
    __m512 sum = alpha == 1.0f ? _mm512_loadu_ps(l) : _mm512_mul_ps(_mm512_loadu_ps(l), _mm512_set1_ps(alpha));
    for (int t = 0; t < NV; t += 2) {  // two registers per BF16 conversion and store
        const __m512 p0 = exp2_softmax(_mm512_sub_ps(s[t], shift)), p1 = exp2_softmax(_mm512_sub_ps(s[t + 1], shift));
        sum = _mm512_add_ps(_mm512_add_ps(sum, p0), p1);
        _mm512_storeu_si512(probs + 16 * t, (__m512i) _mm512_cvtne2ps_pbh(p1, p0));
    }
    _mm512_storeu_ps(l, sum);
    return alpha;
}

// Query rows i0.. of head h: scaled BF16 queries into st (zeros past D and past the last row), the
// running state reset. Returns the number of query rows of the tile.
int64_t start_tile(const job & j, const ggml_tensor * q, tile_state & st);

// The tile's normalized output rows into dst [D * H, N].
void finish_tile(const job & j, int64_t n_rows, ggml_tensor * dst, const tile_state & st);

// dst->src = {q, Kp, Vp, mask, mask rows}, AMX layout (dims_of(q, true)); (head, query tile) pairs
// split across threads (kernels/x86/attn_amx.cpp).
void attend_tiles(ggml_tensor * dst, int ith, int nth);

// Built with -DMLLAMA_AMX_ATTN_PHASES (bench/amx_sweep.sh): the time stamp counter's ticks that attend_tiles
// spent in each phase of its steps, summed over threads and calls: scores, P V, softmax, update of o.
#ifdef MLLAMA_AMX_ATTN_PHASES
void tile_phase_ticks(uint64_t out[4]);
#endif

}  // namespace mllama::attn
