// BF16 flash attention for the vision tower on AVX-512 BF16 CPUs (see kernels/dispatch.h).
//
// Two packing ops put K and V in the layouts the dot-product instruction wants (vdpbf16ps adds
// a.pair[i] . b.pair[i] into lane i; kernels/x86/attn_bf16.h), then the attention op walks query
// tiles x key chunks: 16 keys per zmm and one d pair for the scores, 16 channels per zmm and one key
// pair for P V. With AMX tiles (kernels/x86/attn_amx.cpp) the same packing feeds tile products.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/attn_bf16.h"
#include "kernels/x86/entry_points.h"

namespace mllama::attn {
namespace {

// The ops' userdata: whether K is packed, and the attention run, for AMX tiles.
constexpr bool k_layouts[2] = {false, true};

// Channels c0..c0+15 of row (h, j) of t [D, H, N] F32 as 16 BF16 values (zeros past D).
MLLAMA_AVX512_TARGET inline __m256i row_bf16(const ggml_tensor * t, const dims & d, int64_t h, int64_t j, int64_t c0) {
    const auto * row = reinterpret_cast<const float *>(static_cast<const char *>(t->data) + h * t->nb[1] + j * t->nb[2]);
    const __mmask16 live = static_cast<__mmask16>((1u << std::clamp<int64_t>(d.D - c0, 0, 16)) - 1u);
    return (__m256i) _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, row + c0));
}

// dst->src[0] = k [D, H, N] -> Kp, rows (h, 16-key block) split across threads: 16 keys x 16 channel pairs
// at a time, transposed in registers (the GEMM's weight packing, gemm_bf16.cpp, does the same).
MLLAMA_AVX512_TARGET void pack_k(ggml_tensor * dst, int ith, int nth, void * tiles) {
    const ggml_tensor * k = dst->src[0];
    const dims d = dims_of(k, *static_cast<const bool *>(tiles));
    uint32_t * out = packed_rows(dst);
    const int64_t n_blocks = d.Np / 16;
    for (int64_t row = ith; row < d.H * n_blocks; row += nth) {
        const int64_t h = row / n_blocks, jb = row % n_blocks;
        uint32_t * o = out + row * d.Pk * 16;
        for (int64_t p0 = 0; p0 < d.Pk; p0 += 16) {
            __m512i keys[16], pairs[16];  // keys[jl]: key jl's pairs p0..p0+15; pairs[i]: pair p0 + i of the 16 keys
            for (int64_t jl = 0; jl < 16; ++jl) {
                const int64_t j = jb * 16 + jl;
                keys[jl] = j < d.N ? _mm512_inserti64x4(_mm512_castsi256_si512(row_bf16(k, d, h, j, 2 * p0)),
                                                         row_bf16(k, d, h, j, 2 * p0 + 16), 1)
                                   : _mm512_setzero_si512();
            }
            simd::transpose16(keys, pairs);
            for (int64_t i = 0; i < std::min<int64_t>(16, d.Pk - p0); ++i) _mm512_storeu_si512(o + (p0 + i) * 16, pairs[i]);
        }
    }
}

// dst->src[0] = v [D, H, N] -> Vp, rows (h, key pair) split across threads.
MLLAMA_AVX512_TARGET void pack_v(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * v = dst->src[0];
    const dims d = dims_of(v, false);  // V's layout is the same for both paths
    uint32_t * out = packed_rows(dst);
    const int64_t n_pairs = d.Np / 2;
    for (int64_t row = ith; row < d.H * n_pairs; row += nth) {
        const int64_t h = row / n_pairs, j = 2 * (row % n_pairs);
        uint32_t * o = out + row * d.Dv;
        for (int64_t g = 0; g < d.groups(); ++g) {  // (V[j][c], V[j+1][c]) for 16 channels c
            const __m512i lo = _mm512_cvtepu16_epi32(j < d.N ? row_bf16(v, d, h, j, 16 * g) : _mm256_setzero_si256());
            const __m512i hi = _mm512_cvtepu16_epi32(j + 1 < d.N ? row_bf16(v, d, h, j + 1, 16 * g) : _mm256_setzero_si256());
            _mm512_storeu_si512(o + 16 * g, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

// Scores of k_rows query rows against the 64 keys at jb: s[r][t] covers keys jb + 16 t ..
MLLAMA_AVX512_TARGET inline void scores(const job & jb_, const uint32_t * q, int64_t jb, __m512 s[k_rows][4]) {
    const int64_t P = jb_.d.Pk;
    for (int r = 0; r < k_rows; ++r)
        for (int t = 0; t < 4; ++t) s[r][t] = _mm512_setzero_ps();
    const uint32_t * kb = jb_.kp + (jb / 16) * P * 16;
    for (int64_t p = 0; p < P; ++p) {
        __m512bh kv[4];
        for (int t = 0; t < 4; ++t) kv[t] = (__m512bh) _mm512_loadu_si512(kb + (t * P + p) * 16);
        for (int r = 0; r < k_rows; ++r) {
            const __m512bh qb = (__m512bh) _mm512_set1_epi32(static_cast<int>(q[r * P + p]));
            for (int t = 0; t < 4; ++t) s[r][t] = _mm512_dpbf16_ps(s[r][t], qb, kv[t]);
        }
    }
}

// o = alpha o + P V for rows r0..r0+3 over the 64 keys at jb.
template <int NG>
MLLAMA_AVX512_TARGET inline void pv(const job & j, tile_state & st, int64_t r0, int64_t jb, const uint16_t (*probs)[k_key_block],
                                    const float * alpha) {
    const int64_t Dv = j.d.Dv;
    __m512 acc[k_rows][NG];
    for (int r = 0; r < k_rows; ++r)
        for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_setzero_ps();
    const uint32_t * vb = j.vp + (jb / 2) * Dv;
    for (int64_t jp = 0; jp < k_key_block / 2; ++jp) {
        __m512bh pb[k_rows];
        for (int r = 0; r < k_rows; ++r) {
            uint32_t pair;
            std::memcpy(&pair, probs[r] + 2 * jp, sizeof(pair));
            pb[r] = (__m512bh) _mm512_set1_epi32(static_cast<int>(pair));
        }
        for (int g = 0; g < NG; ++g) {
            const __m512bh vv = (__m512bh) _mm512_loadu_si512(vb + jp * Dv + g * 16);
            for (int r = 0; r < k_rows; ++r) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], pb[r], vv);
        }
    }
    for (int r = 0; r < k_rows; ++r) {
        float * o = st.o.data() + (r0 + r) * Dv;
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int g = 0; g < NG; ++g) _mm512_storeu_ps(o + 16 * g, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16 * g), a, acc[r][g]));
    }
}

// Scores of rows r0..r0+3 against the 64 keys at jb, stored to out.
MLLAMA_AVX512_TARGET inline void score_block(const job & j, const uint32_t * q, int64_t jb, float (*out)[k_key_block]) {
    __m512 s[k_rows][4];
    scores(j, q, jb, s);
    for (int r = 0; r < k_rows; ++r)
        for (int t = 0; t < 4; ++t) _mm512_store_ps(out[r] + 16 * t, s[r][t]);
}

// Rows r0..r0+3 against the key blocks jb0..jb1, software-pipelined: the softmax of a block sits in
// program order right before the scores of the next one, which do not depend on it, so the core
// runs the dot products while the softmax waits on its reductions and exponentials. masked_rows:
// some of these rows have a mask (the blocks holding padding keys are masked in any case); all_masked:
// all of them, which skip the blocks the mask hides from them (attn_mask.h).
template <int NG>
MLLAMA_AVX512_TARGET void sweep(const job & j, tile_state & st, int64_t r0, int64_t jb0, int64_t jb1, bool masked_rows,
                                bool all_masked) {
    const auto live = [&](int64_t jb) { return all_masked ? j.masks.next_live(jb, jb1) : jb; };
    jb0 = live(jb0);
    if (jb0 >= jb1) return;
    const uint32_t * q = st.q.data() + r0 * j.d.Pk;
    alignas(64) float sbuf[2][k_rows][k_key_block];
    alignas(64) uint16_t probs[k_rows][k_key_block];
    float alpha[k_rows];
    score_block(j, q, jb0, sbuf[0]);
    for (int64_t jb = jb0, next = 0, b = 0; jb < jb1; jb = next, ++b) {
        next = live(jb + k_key_block);
        float (*cur)[k_key_block] = sbuf[b & 1];
        for (int r = 0; r < k_rows; ++r) {
            __m512 s[4];
            for (int t = 0; t < 4; ++t) s[t] = _mm512_load_ps(cur[r] + 16 * t);
            mask_scores(j, std::min(j.i0 + r0 + r, j.d.N - 1), jb, masked_rows, s);  // padding rows: the last mask row
            alpha[r] = softmax_row(s, st.m[r0 + r], st.l.data() + (r0 + r) * 16, probs[r]);
        }
        if (next < jb1) score_block(j, q, next, sbuf[(b + 1) & 1]);
        pv<NG>(j, st, r0, jb, probs, alpha);
    }
}

using sweep_fn = void (*)(const job &, tile_state &, int64_t, int64_t, int64_t, bool, bool);

sweep_fn sweep_for(int64_t groups) {
    static const sweep_fn table[] = {sweep<1>, sweep<2>, sweep<3>, sweep<4>, sweep<5>, sweep<6>, sweep<7>, sweep<8>};
    return table[groups - 1];
}

void run_tile(const job & j, const ggml_tensor * q, ggml_tensor * dst, tile_state & st) {
    const int64_t n_rows = start_tile(j, q, st);
    const int64_t n_micro = (n_rows + k_rows - 1) / k_rows;
    std::vector<bool> some(n_micro), all(n_micro);  // micro steps some / all of whose rows have a mask
    for (int64_t m = 0; m < n_micro; ++m) {
        some[m] = j.rows_masked(m * k_rows, k_rows);
        all[m] = j.rows_all_masked(m * k_rows, k_rows);
    }
    const sweep_fn run = sweep_for(j.d.groups());
    for (int64_t c0 = 0; c0 < j.d.Np; c0 += k_key_chunk) {
        const int64_t c1 = std::min(c0 + k_key_chunk, j.d.Np);
        for (int64_t m = 0; m < n_micro; ++m) run(j, st, m * k_rows, c0, c1, some[m], all[m]);
    }
    finish_tile(j, n_rows, dst, st);
}

// dst->src = {q, Kp, Vp, mask, mask rows}; (head, query tile) pairs split across threads.
void attend(ggml_tensor * dst, int ith, int nth, void * tiles) {
    if (*static_cast<const bool *>(tiles)) return attend_tiles(dst, ith, nth);
    const ggml_tensor * q = dst->src[0];
    const dims d = dims_of(q, false);
    const int64_t n_tiles = (d.N + k_query_tile - 1) / k_query_tile;
    tile_state st;
    st.q.resize(k_query_tile * d.Pk);
    st.m.resize(k_query_tile);
    st.l.resize(k_query_tile * 16);
    st.o.resize(k_query_tile * d.Dv);
    for (int64_t w = ith; w < d.H * n_tiles; w += nth) {
        job j{d, w / n_tiles, (w % n_tiles) * k_query_tile, nullptr, nullptr, dst->src[3],
              mask_view_of(dst->src[4], d.N)};
        j.kp = packed_rows(dst->src[1]) + j.h * d.Np * d.Pk;
        j.vp = packed_rows(dst->src[2]) + j.h * (d.Np / 2) * d.Dv;
        run_tile(j, q, dst, st);
    }
}

}  // namespace

// Query row i of head h times scale as BF16 pairs into out (Pk pairs; those past D stay as they are).
MLLAMA_AVX512_TARGET static void query_pairs(const ggml_tensor * q, const dims & d, int64_t h, int64_t i, float scale,
                                             uint32_t * out) {
    if (q->nb[0] != sizeof(float)) {  // a strided view: one pair at a time
        for (int64_t c = 0; c < d.D; c += 2)
            out[c / 2] = bf16_pair(elem(q, c, h, i) * scale, c + 1 < d.D ? elem(q, c + 1, h, i) * scale : 0.0f);
        return;
    }
    const auto * row = reinterpret_cast<const float *>(static_cast<const char *>(q->data) + h * q->nb[1] + i * q->nb[2]);
    for (int64_t c0 = 0; c0 < d.D; c0 += 16) {  // 16 channels = 8 pairs, zeros past D
        const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(d.D - c0, 16)) - 1u);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, row + c0), _mm512_set1_ps(scale));
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + c0 / 2), (__m256i) _mm512_cvtneps_pbh(x));
    }
}

int64_t start_tile(const job & j, const ggml_tensor * q, tile_state & st) {
    const int64_t n_rows = std::min(k_query_tile, j.d.N - j.i0);
    const float scale = query_scale(j.d.D);
    std::fill(st.q.begin(), st.q.end(), 0u);
    for (int64_t r = 0; r < n_rows; ++r) query_pairs(q, j.d, j.h, j.i0 + r, scale, st.q.data() + r * j.d.Pk);
    std::fill(st.m.begin(), st.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(st.o.begin(), st.o.end(), 0.0f);
    std::fill(st.l.begin(), st.l.end(), 0.0f);
    return n_rows;
}

void finish_tile(const job & j, int64_t n_rows, ggml_tensor * dst, const tile_state & st) {
    const dims & d = j.d;
    for (int64_t r = 0; r < n_rows; ++r) {  // dst [D * H, N]
        auto * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + (j.i0 + r) * dst->nb[1]) + j.h * d.D;
        float l = 0.0f;
        for (int lane = 0; lane < 16; ++lane) l += st.l[r * 16 + lane];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t c = 0; c < d.D; ++c) out[c] = st.o[r * d.Dv + c] * inv;
    }
}

}  // namespace mllama::attn

namespace mllama {
using namespace attn;

ggml_tensor * bf16_attention_avx512(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                                    ggml_tensor * mask_rows, bool tiles) {
    tiles = tiles && amx_tiles_available();
    void * layout = const_cast<bool *>(&k_layouts[tiles ? 1 : 0]);
    const dims d = dims_of(q, tiles);
    if (k->nb[0] != sizeof(float)) k = ggml_cont(ctx, k);  // the packing reads channels as rows
    if (v->nb[0] != sizeof(float)) v = ggml_cont(ctx, v);
    const int64_t pad = k_cache_line / sizeof(uint32_t);  // packed_rows: the layout from the first line boundary
    ggml_tensor * kp = ggml_custom_4d(ctx, GGML_TYPE_I32, d.Pk * d.Np * d.H + pad, 1, 1, 1, &k, /*n_args=*/1, pack_k,
                                      GGML_N_TASKS_MAX, layout);  // Kp [Pk * Np * H + pad]
    ggml_tensor * vp = ggml_custom_4d(ctx, GGML_TYPE_I32, d.Dv * d.Np / 2 * d.H + pad, 1, 1, 1, &v, /*n_args=*/1,
                                      pack_v, GGML_N_TASKS_MAX, layout);  // Vp [Dv * Np / 2 * H + pad]
    ggml_tensor * args[] = {q, kp, vp, mask, mask_rows};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, d.D * d.H, d.N, 1, 1, args, /*n_args=*/5, attend, GGML_N_TASKS_MAX,
                          layout);  // [D * H, N]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
