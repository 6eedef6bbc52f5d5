// The vision tower's BF16 flash attention with its two products on Intel AMX tiles (layouts in
// kernels/x86/attn_bf16.h; the AVX-512 path is kernels/x86/attn_bf16.cpp).
//
// A step is 16 query rows against k_step_keys keys (a key chunk): the scores S = Q K^T in four C tiles
// per 64 keys (16 rows x 16 keys each; A: the rows' scaled BF16 queries, 16 channel pairs per tile
// row; B: a 16-key block of Kp, channel pairs as rows), stored; the masked online softmax over the
// whole chunk on AVX-512 (one maximum test per row and chunk), whose BF16 probabilities are the A
// tiles of P V (16 rows x 16 key pairs) against 16 key pairs x 16 channels of Vp, up to six channel
// groups of C tiles accumulating over the chunk; then o = alpha o + P V in memory (a tile cannot be
// rescaled). Steps overlap: the scores of step i + 1 and the P V of step i go to the tile unit, then
// the softmax of step i + 1 and step i's update of o run on the vector units while the products finish.
// (On the 16-core Xeon of bench/README.md, 2026-12-04, that order took 13% less time than putting the
// softmax rows between the P V tile products; bench/amx_sweep.sh.)
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/attn_bf16.h"

#include <memory>

#ifdef MLLAMA_AMX_ATTN_PHASES
#include <atomic>

#include <x86intrin.h>
#endif

namespace mllama::attn {
namespace {

constexpr int k_block_rows = amx::k_tile_rows;  // query rows per step
constexpr int k_pv_groups = 6;                  // channel groups (C tiles) of P V per pass
// keys per step: a key chunk (bench/amx_sweep.sh times others, -D at build time)
#ifndef MLLAMA_AMX_ATTN_STEP_KEYS
#define MLLAMA_AMX_ATTN_STEP_KEYS k_key_chunk
#endif
constexpr int64_t k_step_keys = MLLAMA_AMX_ATTN_STEP_KEYS;
// Where a step's time goes (attn_bf16.h's tile_phase_ticks): each phase between two reads of the time
// stamp counter, which does not wait for the tile unit, so the split is what the core saw, not exact.
#ifdef MLLAMA_AMX_ATTN_PHASES
std::atomic<uint64_t> g_phase_ticks[4];
#define MLLAMA_PHASE(i, ...)                                  \
    do {                                                      \
        const uint64_t t0_ = __rdtsc();                       \
        __VA_ARGS__;                                          \
        local_ticks[i] += __rdtsc() - t0_;                    \
    } while (0)
#else
#define MLLAMA_PHASE(i, ...) __VA_ARGS__
#endif

static_assert(k_key_chunk % k_step_keys == 0 && k_step_keys % k_key_block == 0 && k_step_keys <= 4 * k_key_block,
              "a step is 1 to 4 blocks of 64 keys within a key chunk");

// One step: 16 rows (r0..) of the query tile against keys jb0..jb0 + n_keys - 1.
struct step {
    int64_t r0 = 0, jb0 = 0, n_keys = 0;
    bool masked_rows = false;  // some of the rows have a mask
};

// A step's buffers from its scores to its update of o (two of them alternate in the pipeline).
struct step_buffers {
    alignas(64) uint16_t probs[k_block_rows][k_step_keys];
    float alpha[k_block_rows];
};

// C0..3 += the query tile A (pairs p..p+15) against the four 16-key groups of a 64-key block of Kp at kb.
template <class Tiles, int A>
MLLAMA_AMX_TARGET void key_groups(const uint32_t * kb, int64_t Pk, int64_t p) {
    Tiles::template load<7>(kb + (0 * Pk + p) * 16, amx::k_tile_bytes);
    Tiles::template dot_bf16<0, A, 7>();
    Tiles::template load<7>(kb + (1 * Pk + p) * 16, amx::k_tile_bytes);
    Tiles::template dot_bf16<1, A, 7>();
    Tiles::template load<7>(kb + (2 * Pk + p) * 16, amx::k_tile_bytes);
    Tiles::template dot_bf16<2, A, 7>();
    Tiles::template load<7>(kb + (3 * Pk + p) * 16, amx::k_tile_bytes);
    Tiles::template dot_bf16<3, A, 7>();
}

// Scores of the 16 rows at q (Pk pairs each) against the 64 keys at jb -> s [16][64] (row stride s_stride
// bytes). KQ: the tiles 4.. hold the rows' KQ x 16 query pairs (the whole Pk, loaded once per step); 0: q is
// loaded per 16 pairs into tile 4.
template <class Tiles, int KQ>
MLLAMA_AMX_TARGET void score_block(const job & j, const uint32_t * q, int64_t jb, float * s, size_t s_stride) {
    const int64_t Pk = j.d.Pk;
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    Tiles::template zero<2>();
    Tiles::template zero<3>();
    const uint32_t * kb = j.kp + (jb / 16) * Pk * 16;  // 16-key blocks of Pk rows x 16 keys
    if constexpr (KQ == 0) {
        for (int64_t p = 0; p < Pk; p += amx::k_tile_rows) {
            Tiles::template load<4>(q + p, Pk * 4);
            key_groups<Tiles, 4>(kb, Pk, p);
        }
    } else {
        key_groups<Tiles, 4>(kb, Pk, 0);
        if constexpr (KQ > 1) key_groups<Tiles, 5>(kb, Pk, 16);
        if constexpr (KQ > 2) key_groups<Tiles, 6>(kb, Pk, 32);
    }
    Tiles::template store<0>(s + 0, s_stride);
    Tiles::template store<1>(s + 16, s_stride);
    Tiles::template store<2>(s + 32, s_stride);
    Tiles::template store<3>(s + 48, s_stride);
}

template <class Tiles, int KQ>
MLLAMA_AMX_TARGET void score_keys(const job & j, const uint32_t * q, const step & sp, float (*s)[k_step_keys]) {
    if constexpr (KQ > 0) Tiles::template load<4>(q, j.d.Pk * 4);
    if constexpr (KQ > 1) Tiles::template load<5>(q + 16, j.d.Pk * 4);
    if constexpr (KQ > 2) Tiles::template load<6>(q + 32, j.d.Pk * 4);
    for (int64_t k = 0; k < sp.n_keys; k += k_key_block) score_block<Tiles, KQ>(j, q, sp.jb0 + k, s[0] + k, sizeof(s[0]));
}

// The scores of a step's 16 rows over its keys -> s [16][k_step_keys]; queries of up to 48 pairs (D <= 96)
// stay in tiles for the whole step.
template <class Tiles>
MLLAMA_AMX_TARGET void score_step(const job & j, const tile_state & st, const step & sp, float (*s)[k_step_keys]) {
    const uint32_t * q = st.q.data() + sp.r0 * j.d.Pk;
    switch (j.d.Pk / amx::k_tile_rows) {
        case 1: score_keys<Tiles, 1>(j, q, sp, s); break;
        case 2: score_keys<Tiles, 2>(j, q, sp, s); break;
        case 3: score_keys<Tiles, 3>(j, q, sp, s); break;
        default: score_keys<Tiles, 0>(j, q, sp, s); break;
    }
}

// Softmax of row r of a step over its NB blocks of 64 keys: masked where the row or a padding key asks.
template <int NB>
MLLAMA_AVX512_TARGET void softmax_step_row(const job & j, tile_state & st, const step & sp, int r,
                                           const float (*s)[k_step_keys], step_buffers & buf) {
    __m512 row[4 * NB];
    for (int t = 0; t < 4 * NB; ++t) row[t] = _mm512_load_ps(s[r] + 16 * t);
    const int64_t i = std::min(j.i0 + sp.r0 + r, j.d.N - 1);  // padding rows reuse the last mask row
    for (int b = 0; b < NB; ++b) {
        const int64_t jb = sp.jb0 + b * k_key_block;
        mask_scores(j, i, jb, sp.masked_rows, row + 4 * b);
    }
    const int64_t rr = sp.r0 + r;
    buf.alpha[r] = softmax_row(row, st.m[rr], st.l.data() + rr * 16, buf.probs[r]);
}

// Softmax of a step's rows (none when sp.n_keys is 0: no step).
MLLAMA_AVX512_TARGET void softmax_step(const job & j, tile_state & st, const step & sp, const float (*s)[k_step_keys],
                                       step_buffers & buf) {
    for (int r = 0; r < k_block_rows; ++r) {
        switch (sp.n_keys / k_key_block) {
            case 0: return;
            case 1: softmax_step_row<1>(j, st, sp, r, s, buf); break;
            case 2: softmax_step_row<2>(j, st, sp, r, s, buf); break;
            case 3: softmax_step_row<3>(j, st, sp, r, s, buf); break;
            default: softmax_step_row<4>(j, st, sp, r, s, buf); break;
        }
    }
}

// Channel groups g0..g0+NG-1 of P V over a step's keys -> pv [16][Dv] F32 (those columns).
template <class Tiles, int NG>
MLLAMA_AMX_TARGET void pv_groups(const job & j, const step & sp, const step_buffers & buf, int64_t g0, float * pv) {
    const int64_t Dv = j.d.Dv;
    if constexpr (NG > 0) Tiles::template zero<0>();
    if constexpr (NG > 1) Tiles::template zero<1>();
    if constexpr (NG > 2) Tiles::template zero<2>();
    if constexpr (NG > 3) Tiles::template zero<3>();
    if constexpr (NG > 4) Tiles::template zero<4>();
    if constexpr (NG > 5) Tiles::template zero<5>();
    const int n_halves = static_cast<int>(sp.n_keys / 32);
    const size_t v_stride = static_cast<size_t>(Dv) * 4;
    for (int h = 0; h < n_halves; ++h) {  // 16 key pairs per A tile
        Tiles::template load<6>(buf.probs[0] + h * 32, sizeof(buf.probs[0]));
        const uint32_t * vb = j.vp + (sp.jb0 / 2 + h * 16) * Dv + g0 * 16;  // 16 key pair rows of Dv channels
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

// P V of a step -> pv.
template <class Tiles>
MLLAMA_AMX_TARGET void pv_step(const job & j, const step & sp, const step_buffers & buf, float * pv) {
    for (int64_t g0 = 0; g0 < j.d.groups(); g0 += k_pv_groups) {
        switch (std::min<int64_t>(k_pv_groups, j.d.groups() - g0)) {
            case 1: pv_groups<Tiles, 1>(j, sp, buf, g0, pv); break;
            case 2: pv_groups<Tiles, 2>(j, sp, buf, g0, pv); break;
            case 3: pv_groups<Tiles, 3>(j, sp, buf, g0, pv); break;
            case 4: pv_groups<Tiles, 4>(j, sp, buf, g0, pv); break;
            case 5: pv_groups<Tiles, 5>(j, sp, buf, g0, pv); break;
            default: pv_groups<Tiles, 6>(j, sp, buf, g0, pv); break;
        }
    }
}

// o = alpha o + P V for a step's rows.
MLLAMA_AVX512_TARGET void update_output(const job & j, tile_state & st, const step & sp, const step_buffers & buf,
                                        const float * pv) {
    const int64_t Dv = j.d.Dv;
    for (int r = 0; r < k_block_rows; ++r) {
        float * o = st.o.data() + (sp.r0 + r) * Dv;
        const __m512 a = _mm512_set1_ps(buf.alpha[r]);
        for (int64_t c = 0; c < Dv; c += 16) {
            _mm512_storeu_ps(o + c, _mm512_fmadd_ps(_mm512_loadu_ps(o + c), a, _mm512_loadu_ps(pv + r * Dv + c)));
        }
    }
}

// Workspace of one thread.
struct workspace {
    alignas(64) float s[k_block_rows][k_step_keys];
    step_buffers buf[2];
    line_vector<float> pv;    // [16][Dv]
    std::vector<step> steps;  // of the current query tile
    bool masked[k_query_tile / k_block_rows];      // whether some row of each 16-row block of the tile has a mask
    bool all_masked[k_query_tile / k_block_rows];  // whether all do (they skip the key blocks the mask hides)
};

// The steps of 16 rows over keys k0..k0 + n - 1; rows that all have a mask take only the keys from the first
// block to the last that the mask does not hide from them (none: no step).
void add_step(const job & j, std::vector<step> & steps, int64_t r0, int64_t k0, int64_t n, bool masked,
              bool all_masked) {
    if (all_masked) {
        const int64_t first = j.masks.next_live(k0, k0 + n);
        int64_t end = first;
        for (int64_t jb = first; jb < k0 + n; jb = j.masks.next_live(jb + k_key_block, k0 + n)) end = jb + k_key_block;
        k0 = first, n = end - first;
    }
    if (n > 0) steps.push_back({r0, k0, n, masked});
}

// The steps of a query tile (key chunks outer, 16-row blocks inner), overlapped as the file's head says.
template <class Tiles>
MLLAMA_AMX_TARGET void sweep_tile(const job & j, tile_state & st, int64_t n_rows, workspace & ws) {
    std::vector<step> & steps = ws.steps;
    steps.clear();
    const int64_t n_blocks = (n_rows + k_block_rows - 1) / k_block_rows;
    for (int64_t b = 0; b < n_blocks; ++b) {
        ws.masked[b] = j.rows_masked(b * k_block_rows, k_block_rows);
        ws.all_masked[b] = j.rows_all_masked(b * k_block_rows, k_block_rows);
    }
    for (int64_t c0 = 0; c0 < j.d.Np; c0 += k_key_chunk) {  // keys chunk by chunk, each chunk step by step
        for (int64_t b = 0; b < n_blocks; ++b) {
            for (int64_t k0 = c0; k0 < std::min(c0 + k_key_chunk, j.d.Np); k0 += k_step_keys) {
                const int64_t n = std::min(k_step_keys, j.d.Np - k0);
                add_step(j, steps, b * k_block_rows, k0, n, ws.masked[b], ws.all_masked[b]);
            }
        }
    }
    if (steps.empty()) return;  // every key hidden from every row: the outputs stay zeros
#ifdef MLLAMA_AMX_ATTN_PHASES
    uint64_t local_ticks[4] = {};
#endif
    score_step<Tiles>(j, st, steps[0], ws.s);
    softmax_step(j, st, steps[0], ws.s, ws.buf[0]);
    for (size_t i = 0; i < steps.size(); ++i) {
        const step next = i + 1 < steps.size() ? steps[i + 1] : step{};
        if (next.n_keys) MLLAMA_PHASE(0, score_step<Tiles>(j, st, next, ws.s));
        MLLAMA_PHASE(1, pv_step<Tiles>(j, steps[i], ws.buf[i & 1], ws.pv.data()));
        MLLAMA_PHASE(2, softmax_step(j, st, next, ws.s, ws.buf[(i + 1) & 1]));
        MLLAMA_PHASE(3, update_output(j, st, steps[i], ws.buf[i & 1], ws.pv.data()));
    }
#ifdef MLLAMA_AMX_ATTN_PHASES
    for (int p = 0; p < 4; ++p) g_phase_ticks[p] += local_ticks[p];
#endif
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
    auto ws = std::make_unique<workspace>();
    ws->pv.resize(static_cast<size_t>(k_block_rows * d.Dv));
    amx::tile_scope<Tiles> scope(amx::k_full_tiles);
    for (int64_t w = ith; w < d.H * n_tiles; w += nth) {
        job j{d, w / n_tiles, (w % n_tiles) * k_query_tile, nullptr, nullptr, dst->src[3],
              mask_view_of(dst->src[4], d.N)};
        j.kp = packed_rows(dst->src[1]) + j.h * d.Np * d.Pk;
        j.vp = packed_rows(dst->src[2]) + j.h * (d.Np / 2) * d.Dv;
        const int64_t n_rows = start_tile(j, q, st);
        sweep_tile<Tiles>(j, st, n_rows, *ws);
        finish_tile(j, n_rows, dst, st);
    }
}

}  // namespace

#ifdef MLLAMA_AMX_ATTN_PHASES
void tile_phase_ticks(uint64_t out[4]) {
    for (int p = 0; p < 4; ++p) out[p] = g_phase_ticks[p].load();
}
#endif

void attend_tiles(ggml_tensor * dst, int ith, int nth) {
    if (amx_tiles_emulated()) run<amx::emulated_tiles>(dst, ith, nth);
    else run<amx::hw_tiles>(dst, ith, nth);
}

}  // namespace mllama::attn

#endif  // MLLAMA_X86_KERNELS
