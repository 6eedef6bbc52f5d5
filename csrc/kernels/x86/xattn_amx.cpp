// The cross-attention of prefill (kernels/dispatch.h's cache_attention, from k_xattn_tile_min_tokens tokens)
// with its two products on AMX tiles, as the vision attention's (kernels/x86/attn_amx.cpp): per KV head, the
// query rows of its group (row r: token r / G, query head G h + r % G) in tiles of 16, each walking the keys in
// blocks of 64: scores Q K^T in four C tiles, the masked online softmax (attn_bf16.h's, base 2) on AVX-512, its
// BF16 probabilities the A tiles of P V, o = alpha o + P V in memory. K and V are converted from the F16 cache
// to BF16 once per call and head, in attn_bf16.h's packed layouts (Kp: 16-key blocks of channel pairs, Vp: key
// pairs). Each term carries the BF16 roundings of a query, a key or value and a probability (2^-9 relative
// each), where the vector forms keep the query and the probability in F32.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/attn_bf16.h"
#include "kernels/x86/xattn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace mllama::xattn {
namespace {

constexpr int64_t k_rows = amx::k_tile_rows;  // query rows of a tile
constexpr int64_t k_keys = 64;                // keys per step: four C tiles of scores

// One KV head's keys and values in BF16: kp [n_pad / 16][Pk][16] and vp [n_pad / 2][Dv] pairs (n_pad: keys
// rounded up to k_keys, Dv: D rounded up to the 64 channels of a pass of P V, the padding zeros), Pk = D / 2. Only
// the blocks of 64 keys that some token of the call sees (live; the other sequences' images in a batch are not).
struct packed_head {
    line_vector<uint32_t> kp, vp;  // tile rows on cache lines (kernels/x86/cache_lines.h)
    std::vector<char> live;  // per block of k_keys
};

// Token t's mask row (F16 biases, one per key).
inline const uint16_t * mask_row(const ggml_tensor * mask, int64_t t) {
    return reinterpret_cast<const uint16_t *>(static_cast<const char *>(mask->data) + t * mask->nb[1]);
}

// live[b]: some token sees one of keys 64 b..64 b + 63 (a mask row of 64 -inf is 16 words of four).
void live_blocks(const ggml_tensor * mask, const shape & s, std::vector<char> & live) {
    constexpr uint64_t k_hidden4 = 0x0001000100010001ull * k_f16_neg_inf;
    live.assign(static_cast<size_t>((s.n_kv + k_keys - 1) / k_keys), 0);
    for (int64_t t = 0; t < s.T; ++t) {
        const uint16_t * row = mask_row(mask, t);
        for (int64_t b = 0; b < static_cast<int64_t>(live.size()); ++b) {
            if (live[b]) continue;
            const int64_t j0 = b * k_keys, n = std::min(k_keys, s.n_kv - j0);
            int64_t i = 0;
            for (uint64_t w; i + 4 <= n; i += 4) {
                std::memcpy(&w, row + j0 + i, sizeof(w));
                if (w != k_hidden4) break;
            }
            for (; i < n && !live[b]; ++i) live[b] = row[j0 + i] != k_f16_neg_inf;
        }
    }
}

inline int64_t value_stride(const shape & s) { return (s.D + 63) / 64 * 64; }

MLLAMA_AVX512_TARGET void pack_head(const ggml_tensor * k, const ggml_tensor * v, const shape & s, int64_t h,
                                    int64_t n_pad, packed_head & p) {
    const int64_t Pk = s.D / 2;
    p.kp.resize(static_cast<size_t>(n_pad * Pk));  // zeros once a call: padding keys are never written
    p.vp.resize(static_cast<size_t>(n_pad / 2 * value_stride(s)));
    alignas(64) uint32_t rows[16][k_xattn_max_head_dim / 2];  // 16 keys' BF16 pairs (d, d + 1)
    for (int64_t j0 = 0; j0 < s.n_kv; j0 += 16) {
        if (!p.live[j0 / k_keys]) continue;
        for (int64_t i = 0; i < 16; ++i) {
            if (j0 + i >= s.n_kv) {
                std::fill(rows[i], rows[i] + Pk, 0u);
                continue;
            }
            const ggml_fp16_t * kr = row_of(k, h, j0 + i);
            for (int64_t d = 0; d < s.D; d += 32) {  // 32 channels -> 16 pairs
                const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(kr + d)));
                const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(kr + d + 16)));
                _mm512_store_si512(rows[i] + d / 2, (__m512i) _mm512_cvtne2ps_pbh(hi, lo));
            }
        }
        uint32_t * block = p.kp.data() + (j0 / 16) * Pk * 16;  // [Pk][16 keys]
        for (int64_t c0 = 0; c0 < Pk; c0 += 16) {
            __m512i r[16], t[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(rows[i] + c0);
            simd::transpose16(r, t);  // [Pk][16 keys]
            for (int c = 0; c < 16; ++c) _mm512_storeu_si512(block + (c0 + c) * 16, t[c]);
        }
    }
    for (int64_t j = 0; j < s.n_kv; j += 2) {  // pairs of keys: (V[j][d], V[j + 1][d]), zero past the last key
        if (!p.live[j / k_keys]) continue;
        const ggml_fp16_t * v0 = row_of(v, h, j), * v1 = j + 1 < s.n_kv ? row_of(v, h, j + 1) : nullptr;
        uint32_t * out = p.vp.data() + (j / 2) * value_stride(s);
        for (int64_t d = 0; d < s.D; d += 16) {
            const __m256i a = (__m256i) _mm512_cvtneps_pbh(
                _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(v0 + d))));
            const __m256i b = v1 ? (__m256i) _mm512_cvtneps_pbh(
                                       _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(v1 + d))))
                                 : _mm256_setzero_si256();
            _mm512_storeu_si512(out + d, _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                                                         _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
        }
    }
}

// A tile's query rows: scaled (the graph's 1/sqrt(D) times log2 e) BF16 pairs [16][Pk]; tok[r]: the row's token
// (padding rows: the last token's, their outputs never written).
struct row_tile {
    alignas(64) uint32_t q[k_rows][k_xattn_max_head_dim / 2];
    alignas(64) float o[k_rows][k_xattn_max_head_dim];
    alignas(64) float l[k_rows][16];
    float m[k_rows];
    int64_t tok[k_rows];
    int64_t n = 0;  // live rows
};

void start_rows(const ggml_tensor * q, const shape & s, int64_t h, int64_t r0, row_tile & t) {
    const int64_t n_rows = s.T * s.G;
    t.n = std::min(k_rows, n_rows - r0);
    for (int64_t r = 0; r < k_rows; ++r) {
        const int64_t row = std::min(r0 + r, n_rows - 1), tok = row / s.G, head = h * s.G + row % s.G;
        t.tok[r] = tok;
        const char * at = static_cast<const char *>(q->data) + head * q->nb[1] + tok * q->nb[2];
        const auto * qr = reinterpret_cast<const float *>(at);
        for (int64_t c = 0; c < s.D / 2; ++c) {
            t.q[r][c] = r < t.n ? attn::bf16_pair(qr[2 * c] * attn::k_log2e, qr[2 * c + 1] * attn::k_log2e) : 0;
        }
        t.m[r] = -std::numeric_limits<float>::infinity();
        std::fill(t.l[r], t.l[r] + 16, 0.0f);
        std::fill(t.o[r], t.o[r] + s.D, 0.0f);
    }
}

// Whether some row of the tile sees one of keys j0..j0 + k_keys (its mask is not -inf there).
bool block_live(const ggml_tensor * mask, const shape & s, const row_tile & t, int64_t j0) {
    const int64_t n = std::min(k_keys, s.n_kv - j0);
    for (int64_t r = 0; r < t.n; ++r) {
        if (r > 0 && t.tok[r] == t.tok[r - 1]) continue;
        const uint16_t * row = mask_row(mask, t.tok[r]);
        for (int64_t i = 0; i < n; ++i) {
            if (row[j0 + i] != k_f16_neg_inf) return true;
        }
    }
    return false;
}

// The tile's scores against keys j0..j0 + 63 -> sc [16][64] (base 2: the queries carry log2 e).
template <class Tiles>
MLLAMA_AMX_TARGET void scores(const shape & s, const packed_head & p, int64_t j0, const row_tile & t,
                              float (*sc)[k_keys]) {
    const int64_t Pk = s.D / 2;
    Tiles::template zero<0>(), Tiles::template zero<1>(), Tiles::template zero<2>(), Tiles::template zero<3>();
    const uint32_t * kb = p.kp.data() + (j0 / 16) * Pk * 16;  // four 16-key blocks of Pk rows x 16 keys
    for (int64_t c = 0; c < Pk; c += 16) {  // 16 channel pairs a tile row
        Tiles::template load<4>(t.q[0] + c, sizeof(t.q[0]));
        Tiles::template load<7>(kb + (0 * Pk + c) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<0, 4, 7>();
        Tiles::template load<7>(kb + (1 * Pk + c) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<1, 4, 7>();
        Tiles::template load<7>(kb + (2 * Pk + c) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<2, 4, 7>();
        Tiles::template load<7>(kb + (3 * Pk + c) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<3, 4, 7>();
    }
    const size_t stride = sizeof(sc[0]);
    Tiles::template store<0>(sc[0] + 0, stride), Tiles::template store<1>(sc[0] + 16, stride);
    Tiles::template store<2>(sc[0] + 32, stride), Tiles::template store<3>(sc[0] + 48, stride);
}

// Row r's softmax step over keys j0..j0 + 63: its token's mask (natural log: times log2 e) and -inf past the
// last key added to its scores; the BF16 probabilities to probs, the factor on its earlier output returned.
MLLAMA_AVX512_TARGET float softmax_step(const ggml_tensor * mask, const shape & s, int64_t j0, row_tile & t, int64_t r,
                                        const float * sc, uint16_t * probs) {
    const int64_t valid = std::min(k_keys, s.n_kv - j0);
    const uint16_t * bias_row = mask_row(mask, t.tok[r]) + j0;
    const __m512 log2e = _mm512_set1_ps(attn::k_log2e);
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 row[4];
    for (int i = 0; i < 4; ++i) {
        const __mmask16 live = static_cast<__mmask16>((1u << std::clamp<int64_t>(valid - 16 * i, 0, 16)) - 1u);
        const __m512 bias = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, bias_row + 16 * i));
        row[i] = _mm512_mask_mov_ps(neg_inf, live, _mm512_fmadd_ps(bias, log2e, _mm512_load_ps(sc + 16 * i)));
    }
    return attn::softmax_row(row, t.m[r], t.l[r], probs);
}

// P V over keys j0..j0 + 63 -> pv [16][>= Dv] F32: four channel groups (C tiles) a pass, 16 key pairs an A tile.
template <class Tiles>
MLLAMA_AMX_TARGET void values(const shape & s, const packed_head & p, int64_t j0, const uint16_t (*probs)[k_keys],
                              float (*pv)[k_xattn_max_head_dim]) {
    const int64_t Dv = value_stride(s);
    const size_t stride = static_cast<size_t>(Dv) * sizeof(uint32_t), pv_stride = sizeof(pv[0]);
    for (int64_t g0 = 0; g0 < Dv / 16; g0 += 4) {
        Tiles::template zero<0>(), Tiles::template zero<1>(), Tiles::template zero<2>(), Tiles::template zero<3>();
        for (int64_t half = 0; half < 2; ++half) {
            Tiles::template load<6>(probs[0] + 32 * half, sizeof(probs[0]));
            const uint32_t * vb = p.vp.data() + (j0 / 2 + 16 * half) * Dv + g0 * 16;
            Tiles::template load<7>(vb + 0, stride), Tiles::template dot_bf16<0, 6, 7>();
            Tiles::template load<7>(vb + 16, stride), Tiles::template dot_bf16<1, 6, 7>();
            Tiles::template load<7>(vb + 32, stride), Tiles::template dot_bf16<2, 6, 7>();
            Tiles::template load<7>(vb + 48, stride), Tiles::template dot_bf16<3, 6, 7>();
        }
        float * out = pv[0] + g0 * 16;
        Tiles::template store<0>(out, pv_stride), Tiles::template store<1>(out + 16, pv_stride);
        Tiles::template store<2>(out + 32, pv_stride), Tiles::template store<3>(out + 48, pv_stride);
    }
}

// One step: the tile's rows against keys j0..j0 + 63, then o = alpha o + P V.
template <class Tiles>
MLLAMA_AMX_TARGET void step(const ggml_tensor * mask, const shape & s, const packed_head & p, int64_t j0,
                            row_tile & t) {
    alignas(64) float sc[k_rows][k_keys];
    alignas(64) uint16_t probs[k_rows][k_keys];
    alignas(64) float pv[k_rows][k_xattn_max_head_dim];
    float alpha[k_rows];
    scores<Tiles>(s, p, j0, t, sc);
    for (int64_t r = 0; r < k_rows; ++r) alpha[r] = softmax_step(mask, s, j0, t, r, sc[r], probs[r]);
    values<Tiles>(s, p, j0, probs, pv);
    for (int64_t r = 0; r < k_rows; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int64_t d = 0; d < s.D; d += 16) {
            _mm512_store_ps(t.o[r] + d, _mm512_fmadd_ps(a, _mm512_load_ps(t.o[r] + d), _mm512_load_ps(pv[r] + d)));
        }
    }
}

void finish_rows(ggml_tensor * dst, const shape & s, int64_t h, int64_t r0, const row_tile & t) {
    for (int64_t r = 0; r < t.n; ++r) {  // dst [D * Hq, T]; no live key: 0
        const int64_t row = r0 + r, head = h * s.G + row % s.G;
        float l = 0;
        for (float x : t.l[r]) l += x;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        auto * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t.tok[r] * dst->nb[1]) + head * s.D;
        for (int64_t d = 0; d < s.D; ++d) out[d] = t.o[r][d] * inv;
    }
}

template <class Tiles>
void attend_on(ggml_tensor * dst, int ith, int nth) {
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const shape s = shape_of(q, k);
    const int64_t n_pad = (s.n_kv + k_keys - 1) / k_keys * k_keys, n_tiles = (s.T * s.G + k_rows - 1) / k_rows;
    const int64_t total = s.Hkv * n_tiles, per = (total + nth - 1) / nth;  // units (head, row tile), head-major
    const int64_t w0 = std::min(total, per * ith), w1 = std::min(total, w0 + per);
    if (w0 == w1) return;
    packed_head p;
    live_blocks(mask, s, p.live);
    auto t = std::make_unique<row_tile>();
    amx::tile_scope<Tiles> scope(amx::k_full_tiles);
    for (int64_t w = w0, packed = -1; w < w1; ++w) {
        const int64_t h = w / n_tiles, r0 = (w % n_tiles) * k_rows;
        if (h != packed) pack_head(k, v, s, h, n_pad, p), packed = h;
        start_rows(q, s, h, r0, *t);
        for (int64_t j0 = 0; j0 < s.n_kv; j0 += k_keys) {
            if (p.live[j0 / k_keys] && block_live(mask, s, *t, j0)) step<Tiles>(mask, s, p, j0, *t);
        }
        finish_rows(dst, s, h, r0, *t);
    }
}

}  // namespace

void attend_tiles(ggml_tensor * dst, int ith, int nth) {
    if (amx_tiles_emulated()) attend_on<amx::emulated_tiles>(dst, ith, nth);
    else attend_on<amx::hw_tiles>(dst, ith, nth);
}

}  // namespace mllama::xattn

#endif  // MLLAMA_X86_KERNELS
