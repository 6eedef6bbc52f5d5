// The vision tower's BF16 flash attention with its two products on Intel AMX tiles (layouts in
// kernels/x86/attn_bf16.h; the AVX-512 path is kernels/x86/attn_bf16.cpp).
//
// 16 query rows at a time walk the keys in blocks of 64: the scores S = Q K^T are four C tiles
// (16 rows x 16 keys each; A: the rows' scaled BF16 queries, 16 channel pairs per tile row; B: a
// 16-key block of Kp, channel pairs as rows), stored for the masked online softmax on AVX-512
// (shared with the AVX-512 path), whose BF16 probabilities are the A tiles of P V (16 rows x 16
// key pairs) against 16 key pairs x 16 channels of Vp, up to six channel groups of C tiles at a
// time. The products of a block go to memory and o = alpha o + P V there (a tile cannot be rescaled).
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/attn_bf16.h"

namespace mllama::attn {
namespace {

constexpr int k_block_rows = amx::k_tile_rows;  // query rows per pass over the keys
constexpr int k_pv_groups = 6;                  // channel groups (C tiles) of P V per pass

// Scores of the 16 rows at q (Pk pairs each) against the 64 keys of block jb -> s [16][64] F32.
template <class Tiles>
MLLAMA_AMX_TARGET void score_block(const job & j, const uint32_t * q, int64_t jb, float (*s)[k_key_block]) {
    const int64_t Pk = j.d.Pk;
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    Tiles::template zero<2>();
    Tiles::template zero<3>();
    const uint32_t * kb = j.kp + (jb / 16) * Pk * 16;  // 16-key blocks of Pk rows x 16 keys
    for (int64_t p = 0; p < Pk; p += amx::k_tile_rows) {
        Tiles::template load<4>(q + p, Pk * 4);
        Tiles::template load<5>(kb + (0 * Pk + p) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<0, 4, 5>();
        Tiles::template load<5>(kb + (1 * Pk + p) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<1, 4, 5>();
        Tiles::template load<5>(kb + (2 * Pk + p) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<2, 4, 5>();
        Tiles::template load<5>(kb + (3 * Pk + p) * 16, amx::k_tile_bytes);
        Tiles::template dot_bf16<3, 4, 5>();
    }
    constexpr size_t s_stride = k_key_block * sizeof(float);
    Tiles::template store<0>(s[0] + 0, s_stride);
    Tiles::template store<1>(s[0] + 16, s_stride);
    Tiles::template store<2>(s[0] + 32, s_stride);
    Tiles::template store<3>(s[0] + 48, s_stride);
}

// Channel groups g0..g0+NG-1 of P V for the 64 keys of block jb -> pv [16][Dv] F32 (those columns).
template <class Tiles, int NG>
MLLAMA_AMX_TARGET void pv_groups(const job & j, const uint16_t (*probs)[k_key_block], int64_t jb, int64_t g0, float * pv) {
    const int64_t Dv = j.d.Dv;
    if constexpr (NG > 0) Tiles::template zero<0>();
    if constexpr (NG > 1) Tiles::template zero<1>();
    if constexpr (NG > 2) Tiles::template zero<2>();
    if constexpr (NG > 3) Tiles::template zero<3>();
    if constexpr (NG > 4) Tiles::template zero<4>();
    if constexpr (NG > 5) Tiles::template zero<5>();
    for (int64_t half = 0; half < k_key_block / 32; ++half) {  // 16 key pairs per A tile
        Tiles::template load<6>(probs[0] + half * 32, k_key_block * sizeof(uint16_t));
        const uint32_t * vb = j.vp + (jb / 2 + half * 16) * Dv + g0 * 16;  // 16 key pair rows of Dv channels
        const size_t v_stride = static_cast<size_t>(Dv) * 4;
#define MLLAMA_PV_GROUP(g)                                        \
    if constexpr (NG > g) {                                       \
        Tiles::template load<7>(vb + (g) * 16, v_stride);         \
        Tiles::template dot_bf16<g, 6, 7>();                      \
    }
        MLLAMA_PV_GROUP(0) MLLAMA_PV_GROUP(1) MLLAMA_PV_GROUP(2) MLLAMA_PV_GROUP(3) MLLAMA_PV_GROUP(4) MLLAMA_PV_GROUP(5)
#undef MLLAMA_PV_GROUP
    }
    const size_t pv_stride = static_cast<size_t>(Dv) * sizeof(float);
    if constexpr (NG > 0) Tiles::template store<0>(pv + (g0 + 0) * 16, pv_stride);
    if constexpr (NG > 1) Tiles::template store<1>(pv + (g0 + 1) * 16, pv_stride);
    if constexpr (NG > 2) Tiles::template store<2>(pv + (g0 + 2) * 16, pv_stride);
    if constexpr (NG > 3) Tiles::template store<3>(pv + (g0 + 3) * 16, pv_stride);
    if constexpr (NG > 4) Tiles::template store<4>(pv + (g0 + 4) * 16, pv_stride);
    if constexpr (NG > 5) Tiles::template store<5>(pv + (g0 + 5) * 16, pv_stride);
}

template <class Tiles>
MLLAMA_AMX_TARGET void pv_block(const job & j, const uint16_t (*probs)[k_key_block], int64_t jb, float * pv) {
    for (int64_t g0 = 0; g0 < j.d.groups(); g0 += k_pv_groups) {
        switch (std::min<int64_t>(k_pv_groups, j.d.groups() - g0)) {
            case 1: pv_groups<Tiles, 1>(j, probs, jb, g0, pv); break;
            case 2: pv_groups<Tiles, 2>(j, probs, jb, g0, pv); break;
            case 3: pv_groups<Tiles, 3>(j, probs, jb, g0, pv); break;
            case 4: pv_groups<Tiles, 4>(j, probs, jb, g0, pv); break;
            case 5: pv_groups<Tiles, 5>(j, probs, jb, g0, pv); break;
            default: pv_groups<Tiles, 6>(j, probs, jb, g0, pv); break;
        }
    }
}

// Rows r0..r0+15 of the tile against the key blocks jb0..jb1: scores on tiles, the masked online
// softmax per row, o = alpha o + P V.
template <class Tiles>
MLLAMA_AMX_TARGET void sweep(const job & j, tile_state & st, int64_t r0, int64_t jb0, int64_t jb1, bool masked_rows,
                             float * pv) {
    const int64_t Dv = j.d.Dv;
    const uint32_t * q = st.q.data() + r0 * j.d.Pk;
    alignas(64) float s[k_block_rows][k_key_block];
    alignas(64) uint16_t probs[k_block_rows][k_key_block];
    float alpha[k_block_rows];
    for (int64_t jb = jb0; jb < jb1; jb += k_key_block) {
        score_block<Tiles>(j, q, jb, s);
        const bool masked = masked_rows || jb + k_key_block > j.d.N;
        for (int r = 0; r < k_block_rows; ++r) {
            __m512 row[4];
            for (int t = 0; t < 4; ++t) row[t] = _mm512_load_ps(s[r] + 16 * t);
            if (masked) add_mask(j, std::min(j.i0 + r0 + r, j.d.N - 1), jb, row);  // padding rows reuse the last mask row
            alpha[r] = softmax_row(row, st.m[r0 + r], st.l.data() + (r0 + r) * 16, probs[r]);
        }
        pv_block<Tiles>(j, probs, jb, pv);
        for (int r = 0; r < k_block_rows; ++r) {
            float * o = st.o.data() + (r0 + r) * Dv;
            const __m512 a = _mm512_set1_ps(alpha[r]);
            for (int64_t c = 0; c < Dv; c += 16) {
                _mm512_storeu_ps(o + c, _mm512_fmadd_ps(_mm512_loadu_ps(o + c), a, _mm512_loadu_ps(pv + r * Dv + c)));
            }
        }
    }
}

template <class Tiles>
MLLAMA_AMX_TARGET void run(ggml_tensor * dst, int ith, int nth) {
    const ggml_tensor * q = dst->src[0];
    const dims d = dims_of(q, /*tiles=*/true);
    const int64_t n_tiles = (d.N + k_query_tile - 1) / k_query_tile;
    tile_state st;
    st.q.resize(k_query_tile * d.Pk);
    st.m.resize(k_query_tile);
    st.l.resize(k_query_tile * 16);
    st.o.resize(k_query_tile * d.Dv);
    std::vector<float> pv(static_cast<size_t>(k_block_rows * d.Dv));
    amx::tile_scope<Tiles> scope(amx::full_tiles());
    for (int64_t w = ith; w < d.H * n_tiles; w += nth) {
        job j{d, w / n_tiles, (w % n_tiles) * k_query_tile, nullptr, nullptr, dst->src[3],
              static_cast<const int32_t *>(dst->src[4]->data)};
        j.kp = static_cast<const uint32_t *>(dst->src[1]->data) + j.h * d.Np * d.Pk;
        j.vp = static_cast<const uint32_t *>(dst->src[2]->data) + j.h * (d.Np / 2) * d.Dv;
        const int64_t n_rows = start_tile(j, q, st);
        const int64_t n_blocks = (n_rows + k_block_rows - 1) / k_block_rows;
        for (int64_t c0 = 0; c0 < d.Np; c0 += k_key_chunk) {
            for (int64_t b = 0; b < n_blocks; ++b) {
                sweep<Tiles>(j, st, b * k_block_rows, c0, std::min(c0 + k_key_chunk, d.Np),
                             rows_masked(j, b * k_block_rows, k_block_rows), pv.data());
            }
        }
        finish_tile(j, n_rows, dst, st);
    }
}

}  // namespace

void attend_tiles(ggml_tensor * dst, int ith, int nth) {
    if (amx_tiles_emulated()) run<amx::emulated_tiles>(dst, ith, nth);
    else run<amx::hw_tiles>(dst, ith, nth);
}

}  // namespace mllama::attn

#endif  // MLLAMA_X86_KERNELS
