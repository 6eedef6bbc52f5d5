// Flash attention for the vision tower on AVX2 CPUs without AVX-512 BF16 (see kernels/dispatch.h),
// where ggml's F32 flash attention is most of the image's time (profile in bench/README.md).
//
// K and V are rounded to BF16 once, as on the AVX-512 path, and packed as pairs, so one 32-byte load
// gives 8 lanes of two BF16 values: shifted up 16 they are the first value as F32, masked the second.
//   Kp[h][j/8][d/2][j%8] = (K[h][j][d], K[h][j][d+1])    8 keys x one channel pair
//   Vp[h][j/2][c]        = (V[h][j][c], V[h][j+1][c])    8 channels x one key pair (attn_bf16.h's Vp)
// Q (scaled) and the probabilities stay F32, every product is an F32 FMA. A query tile of 120 rows walks
// the keys in chunks of 512, each widened to F32 once per tile (kf, vf: 320 KiB at head size 80, in L2),
// one block of 64 keys at a time: every group of 5 rows takes its scores against the block (16 keys at a
// time, in 10 ymm) and each row's masked online-softmax step while the block's keys stay in L1, then every
// group its P V into the rows' unnormalized outputs (16 channels at a time) while the block's values do.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/attn_bf16.h"  // to_bf16: the same rounding as the AVX-512 path
#include "kernels/x86/attn_mask.h"
#include "kernels/x86/entry_points.h"
#include "kernels/x86/simd_avx2.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mllama {
namespace {

constexpr int64_t k_key_block = 64;    // keys per softmax step
constexpr int k_rows = 5;              // query rows per micro step (10 ymm sums: more than the 8 FMAs in flight)
// query rows sharing one pass over a key chunk (24 groups of k_rows): 0.98-0.99x the time of 60 rows a tile with
// each group sweeping the chunk alone (bench/README.md)
constexpr int64_t k_query_tile = 120;
constexpr int64_t k_groups = k_query_tile / k_rows;
constexpr int64_t k_key_chunk = 512;   // keys kept hot in L2 while a query tile walks them
constexpr float k_neg_inf = -std::numeric_limits<float>::infinity();

struct dims {
    int64_t D, H, N;  // head size, heads, tokens
    int64_t P;        // channel pairs of Q and K: D rounded up to 2, halved
    int64_t Dv;       // D rounded up to 16 (two ymm): V's channels
    int64_t Np;       // N rounded up to k_key_block
};

dims dims_of(const ggml_tensor * q) {
    return {q->ne[0], q->ne[1], q->ne[2], (q->ne[0] + 1) / 2, (q->ne[0] + 15) / 16 * 16,
            (q->ne[2] + k_key_block - 1) / k_key_block * k_key_block};
}

// Channel c of row (h, j) of t [D, H, N] F32 as BF16 (zero past D or N).
uint32_t bf16_at(const ggml_tensor * t, const dims & d, int64_t c, int64_t h, int64_t j) {
    if (c >= d.D || j >= d.N) return 0;
    const char * at = static_cast<const char *>(t->data) + c * t->nb[0] + h * t->nb[1] + j * t->nb[2];
    return attn::to_bf16(*reinterpret_cast<const float *>(at));
}

// dst->src[0] = k [D, H, N] -> Kp; (head, 8-key block) rows split across threads.
void pack_k(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * k = dst->src[0];
    const dims d = dims_of(k);
    auto * out = static_cast<uint32_t *>(dst->data);
    for (int64_t row = ith; row < d.H * d.Np / 8; row += nth) {
        const int64_t h = row / (d.Np / 8), j0 = row % (d.Np / 8) * 8;
        for (int64_t p = 0; p < d.P; ++p)
            for (int64_t jl = 0; jl < 8; ++jl)
                out[(row * d.P + p) * 8 + jl] = bf16_at(k, d, 2 * p, h, j0 + jl) |
                                                bf16_at(k, d, 2 * p + 1, h, j0 + jl) << 16;
    }
}

// dst->src[0] = v [D, H, N] -> Vp; (head, key pair) rows split across threads.
void pack_v(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * v = dst->src[0];
    const dims d = dims_of(v);
    auto * out = static_cast<uint32_t *>(dst->data);
    for (int64_t row = ith; row < d.H * d.Np / 2; row += nth) {
        const int64_t h = row / (d.Np / 2), j = row % (d.Np / 2) * 2;
        for (int64_t c = 0; c < d.Dv; ++c) out[row * d.Dv + c] = bf16_at(v, d, c, h, j) | bf16_at(v, d, c, h, j + 1) << 16;
    }
}

// 8 lanes of BF16 pairs as two F32 vectors: the pairs' first values (shifted up 16) and second ones
// (the low halves masked off).
MLLAMA_AVX2_TARGET inline void split_pairs(const uint32_t * at, __m256 & first, __m256 & second) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(at));
    first = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    second = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

static_assert(k_query_tile % k_rows == 0, "a tile is whole groups of rows");

struct tile {
    alignas(32) float s[k_groups][k_rows][k_key_block];  // each group's scores against a key block, then probabilities
    float alpha[k_groups][k_rows];                       // each row's factor for its earlier output, at that block
    bool masked_rows[k_groups], all_masked[k_groups];    // some / all of a group's rows have a mask
    std::vector<float> q;  // [k_query_tile][2 P] scaled queries (zeros past D and past the last row)
    std::vector<float> m;  // running max per row
    std::vector<float> l;  // [k_query_tile][8] running sum per row, one partial sum per lane
    std::vector<float> o;  // [k_query_tile][Dv] unnormalized output
    std::vector<float> chunk;  // room for the two below, 32-byte aligned
    float * kf = nullptr;      // the key chunk widened to F32: [key / 8][2 P][8]
    float * vf = nullptr;      // the value chunk widened to F32: [key][Dv]
};

struct job {
    dims d;
    int64_t h, i0;              // head, first query row of the tile
    const uint32_t * kp, * vp;  // this head's packed keys and values
    int64_t c0;                 // the first key of the chunk in tile::kf and tile::vf
    const ggml_tensor * mask;   // [N, N] F16
    attn::mask_view masks;      // its zero rows and hidden key blocks (attn_mask.h)
};
static_assert(k_key_block == attn::k_mask_block, "a key block is one block of the mask's hidden flags");

// Keys c0..c1 (whole 8-key blocks) of Kp and Vp widened to F32 (tile::kf, tile::vf): once per query tile
// and key chunk, for all of the tile's micro steps, whose loops are then loads and FMAs only.
MLLAMA_AVX2_TARGET void widen_chunk(const job & j, int64_t c0, int64_t c1, tile & st) {
    const int64_t P = j.d.P, Dv = j.d.Dv;
    for (int64_t b = c0 / 8; b < c1 / 8; ++b) {
        float * kf = st.kf + (b - c0 / 8) * 2 * P * 8;
        for (int64_t p = 0; p < P; ++p) {
            __m256 lo, hi;  // the 8 keys at channels 2p and 2p + 1
            split_pairs(j.kp + (b * P + p) * 8, lo, hi);
            _mm256_store_ps(kf + 2 * p * 8, lo);
            _mm256_store_ps(kf + (2 * p + 1) * 8, hi);
        }
    }
    for (int64_t jp = c0 / 2; jp < c1 / 2; ++jp) {
        float * vf = st.vf + (2 * jp - c0) * Dv;
        for (int64_t c = 0; c < Dv; c += 8) {
            __m256 lo, hi;  // channels c..c+7 of keys 2jp and 2jp + 1
            split_pairs(j.vp + jp * Dv + c, lo, hi);
            _mm256_store_ps(vf + c, lo);
            _mm256_store_ps(vf + Dv + c, hi);
        }
    }
}

// Scores of k_rows query rows (q: [k_rows][2 P]) against the 64 keys at jb -> s [k_rows][64]. Not inlined: in
// block_step GCC leaves the loop over channels where it falls (off a 64-byte line: CMakeLists.txt), in a function of
// its own it aligns it.
__attribute__((noinline)) MLLAMA_AVX2_TARGET void scores(const job & j, const tile & st, const float * q, int64_t jb,
                                                         float (*s)[k_key_block]) {
    const int64_t K = 2 * j.d.P;  // channels, padded to even
    for (int64_t kb = 0; kb < k_key_block; kb += 16) {  // 16 keys: two 8-key blocks
        const float * k0 = st.kf + (jb - j.c0 + kb) / 8 * K * 8, * k1 = k0 + K * 8;
        __m256 acc[2 * k_rows];
        for (auto & a : acc) a = _mm256_setzero_ps();
        for (int64_t c = 0; c < K; ++c) {
            const __m256 w0 = _mm256_load_ps(k0 + 8 * c), w1 = _mm256_load_ps(k1 + 8 * c);
            for (int r = 0; r < k_rows; ++r) {
                const __m256 qc = _mm256_broadcast_ss(q + r * K + c);
                acc[2 * r] = _mm256_fmadd_ps(qc, w0, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(qc, w1, acc[2 * r + 1]);
            }
        }
        for (int r = 0; r < k_rows; ++r) {
            _mm256_store_ps(s[r] + kb, acc[2 * r]);
            _mm256_store_ps(s[r] + kb + 8, acc[2 * r + 1]);
        }
    }
}

// e^x for x <= 0 as softmax needs it (kernels/x86/simd_avx2.h's exp256; -inf gives 0).
MLLAMA_AVX2_TARGET inline __m256 exp_nonpositive(__m256 x) { return simd::exp256(x); }

// Softmax step of row s (64 scores; the mask row of query i added where the step's rows have masks and this one
// is not all zeros (a row of zeros is not read), -inf past N): updates the running max m and per-lane sums l, leaves
// the probabilities in s, returns the factor that rescales the row's earlier output.
MLLAMA_AVX2_TARGET float softmax_row(const job & j, int64_t i, int64_t jb, bool masked_rows, float * s, float & m,
                                     float * l) {
    const bool row_mask = masked_rows && !j.masks.zero_rows[i];
    const auto * mrow = reinterpret_cast<const uint16_t *>(static_cast<const char *>(j.mask->data) + i * j.mask->nb[1]);
    __m256 v[k_key_block / 8];
    __m256 vmax = _mm256_set1_ps(k_neg_inf);
    for (int t = 0; t < k_key_block / 8; ++t) {
        v[t] = _mm256_load_ps(s + 8 * t);
        const int64_t k0 = jb + 8 * t;
        if (row_mask && k0 + 8 <= j.d.N) {
            v[t] = _mm256_add_ps(v[t], _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(mrow + k0))));
        } else if (k0 + 8 > j.d.N) {  // the block's last keys: the mask where there are keys, -inf past them
            alignas(32) float tail[8];
            for (int64_t e = 0; e < 8; ++e) {
                const float mask = row_mask && k0 + e < j.d.N ? ggml_fp16_to_fp32(mrow[k0 + e]) : 0.0f;
                tail[e] = k0 + e < j.d.N ? s[8 * t + e] + mask : k_neg_inf;
            }
            v[t] = _mm256_load_ps(tail);
        }
        vmax = _mm256_max_ps(vmax, v[t]);
    }
    const float m_new = std::max(m, simd::hmax256(vmax));
    if (m_new == k_neg_inf) {  // everything masked so far
        std::fill(s, s + k_key_block, 0.0f);
        return 1.0f;
    }
    const float alpha = m_new == m ? 1.0f : std::exp(m - m_new);  // the max rarely moves after the first blocks
    m = m_new;
    __m256 sum = _mm256_mul_ps(_mm256_loadu_ps(l), _mm256_set1_ps(alpha));
    for (int t = 0; t < k_key_block / 8; ++t) {
        const __m256 p = exp_nonpositive(_mm256_sub_ps(v[t], _mm256_set1_ps(m_new)));
        sum = _mm256_add_ps(sum, p);
        _mm256_store_ps(s + 8 * t, p);
    }
    _mm256_storeu_ps(l, sum);
    return alpha;
}

// o = alpha o + P V for rows r0..r0+k_rows-1 of the tile over the 64 keys at jb (probabilities p
// [k_rows][64]).
MLLAMA_AVX2_TARGET void pv(const job & j, tile & st, int64_t r0, int64_t jb, const float (*p)[k_key_block],
                           const float * alpha) {
    const int64_t Dv = j.d.Dv;
    for (int64_t c0 = 0; c0 < Dv; c0 += 16) {  // 16 channels at a time
        __m256 acc[2 * k_rows];
        for (auto & a : acc) a = _mm256_setzero_ps();
        const float * vb = st.vf + (jb - j.c0) * Dv + c0;
        for (int64_t key = 0; key < k_key_block; ++key) {
            const __m256 w0 = _mm256_load_ps(vb + key * Dv), w1 = _mm256_load_ps(vb + key * Dv + 8);
            for (int r = 0; r < k_rows; ++r) {
                const __m256 pk = _mm256_broadcast_ss(p[r] + key);
                acc[2 * r] = _mm256_fmadd_ps(pk, w0, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(pk, w1, acc[2 * r + 1]);
            }
        }
        for (int r = 0; r < k_rows; ++r) {
            float * o = st.o.data() + (r0 + r) * Dv + c0;
            const __m256 a = _mm256_set1_ps(alpha[r]);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_loadu_ps(o), a, acc[2 * r]));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_loadu_ps(o + 8), a, acc[2 * r + 1]));
        }
    }
}

// The tile's n_groups groups of rows against the key block at jb (the chunk widened into st): each group's scores
// and softmax step while the block's keys stay in L1, then each group's P V while its values do. A group whose rows
// all have a mask skips a block the mask hides from them (attn_mask.h); the block holding padding keys is masked in
// any case.
MLLAMA_AVX2_TARGET void block_step(const job & j, tile & st, int64_t n_groups, int64_t jb) {
    const bool hidden = j.masks.next_live(jb, jb + k_key_block) != jb;
    for (int64_t g = 0; g < n_groups; ++g) {
        if (hidden && st.all_masked[g]) continue;
        const int64_t r0 = g * k_rows;
        scores(j, st, st.q.data() + r0 * 2 * j.d.P, jb, st.s[g]);
        for (int r = 0; r < k_rows; ++r)  // padding rows reuse the last mask row
            st.alpha[g][r] = softmax_row(j, std::min(j.i0 + r0 + r, j.d.N - 1), jb, st.masked_rows[g], st.s[g][r],
                                         st.m[r0 + r], st.l.data() + (r0 + r) * 8);
    }
    for (int64_t g = 0; g < n_groups; ++g)
        if (!(hidden && st.all_masked[g])) pv(j, st, g * k_rows, jb, st.s[g], st.alpha[g]);
}

void run_tile(job j, const ggml_tensor * q, ggml_tensor * dst, tile & st) {
    const dims & d = j.d;
    const int64_t n_rows = std::min(k_query_tile, d.N - j.i0);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
    std::fill(st.q.begin(), st.q.end(), 0.0f);
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t c = 0; c < d.D; ++c) {
            st.q[r * 2 * d.P + c] = *reinterpret_cast<const float *>(static_cast<const char *>(q->data) + c * q->nb[0] +
                                                                      j.h * q->nb[1] + (j.i0 + r) * q->nb[2]) * scale;
        }
    std::fill(st.m.begin(), st.m.end(), k_neg_inf);
    std::fill(st.l.begin(), st.l.end(), 0.0f);
    std::fill(st.o.begin(), st.o.end(), 0.0f);
    const bool tile_masked = j.masks.all_masked(j.i0, n_rows);  // every row: the chunks hidden from all need no work
    const int64_t n_groups = (n_rows + k_rows - 1) / k_rows;
    for (int64_t g = 0; g < n_groups; ++g) {
        st.masked_rows[g] = j.masks.any_masked(j.i0 + g * k_rows, k_rows);
        st.all_masked[g] = j.masks.all_masked(j.i0 + g * k_rows, k_rows);
    }
    for (int64_t c0 = 0; c0 < d.Np; c0 += k_key_chunk) {
        const int64_t c1 = std::min(c0 + k_key_chunk, d.Np);
        if (tile_masked && j.masks.next_live(c0, c1) == c1) continue;
        widen_chunk(j, c0, c1, st);
        j.c0 = c0;
        for (int64_t jb = c0; jb < c1; jb += k_key_block) block_step(j, st, n_groups, jb);
    }
    for (int64_t r = 0; r < n_rows; ++r) {  // dst [D * H, N]
        auto * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + (j.i0 + r) * dst->nb[1]) + j.h * d.D;
        float l = 0.0f;
        for (int lane = 0; lane < 8; ++lane) l += st.l[r * 8 + lane];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t c = 0; c < d.D; ++c) out[c] = st.o[r * d.Dv + c] * inv;
    }
}

// dst->src = {q, Kp, Vp, mask, mask rows}; (head, query tile) pairs split across threads.
void attend(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * q = dst->src[0];
    const dims d = dims_of(q);
    const int64_t n_tiles = (d.N + k_query_tile - 1) / k_query_tile;
    tile st;
    st.q.resize(k_query_tile * 2 * d.P);
    st.m.resize(k_query_tile);
    st.l.resize(k_query_tile * 8);
    st.o.resize(k_query_tile * d.Dv);
    st.chunk.resize(k_key_chunk * (2 * d.P + d.Dv) + 8);  // + 8: room to align to 32 bytes
    st.kf = st.chunk.data() + (8 - reinterpret_cast<uintptr_t>(st.chunk.data()) / sizeof(float) % 8) % 8;
    st.vf = st.kf + k_key_chunk * 2 * d.P;  // 2 P * 8 and Dv floats per 8 keys: multiples of 8
    for (int64_t w = ith; w < d.H * n_tiles; w += nth) {
        const int64_t h = w / n_tiles;
        const job j{d, h, (w % n_tiles) * k_query_tile, static_cast<const uint32_t *>(dst->src[1]->data) + h * d.Np * d.P,
                    static_cast<const uint32_t *>(dst->src[2]->data) + h * (d.Np / 2) * d.Dv, 0, dst->src[3],
                    attn::mask_view_of(dst->src[4], d.N)};
        run_tile(j, q, dst, st);
    }
}

}  // namespace

ggml_tensor * attention_avx2(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                             ggml_tensor * mask_rows) {
    const dims d = dims_of(q);
    ggml_tensor * kp = ggml_custom_4d(ctx, GGML_TYPE_I32, d.P * d.Np, d.H, 1, 1, &k, /*n_args=*/1, pack_k,
                                      GGML_N_TASKS_MAX, nullptr);  // Kp [P * Np, H]
    ggml_tensor * vp = ggml_custom_4d(ctx, GGML_TYPE_I32, d.Dv * d.Np / 2, d.H, 1, 1, &v, /*n_args=*/1, pack_v,
                                      GGML_N_TASKS_MAX, nullptr);  // Vp [Dv * Np / 2, H]
    ggml_tensor * args[] = {q, kp, vp, mask, mask_rows};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, d.D * d.H, d.N, 1, 1, args, /*n_args=*/5, attend, GGML_N_TASKS_MAX,
                          nullptr);  // [D * H, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
