// The vision tower's BF16 GEMM on Intel AMX tiles (see kernels/x86/gemm_bf16.h for the layout).
//
// y[n][m] = sum_k x[n][k] w[m][k]: tokens are the rows of A tiles (a BF16 token row is already 16 k pairs per
// 64 bytes), copied per block and chunk of k into tiles in the order the steps read them (pack_block: one cache
// line per tile row; the graph's tensors may sit on 32-byte boundaries); the packed weight panels are B tiles as
// they lie (16 pair rows x 16 channels, row stride one panel row), C tiles hold 16 tokens x 16 channels in F32.
// A step keeps 32 tokens x 32 channels in four C tiles over a chunk of the k range (2 A + 2 B tile loads per 4
// tile products) and stores them; where K spans several chunks, the sums wait in memory for the next chunk.
// A thread walks its tokens in blocks of k_block_tokens, each block chunk by chunk (where K spans several chunks,
// for groups of at most k_sums_channels channels in turn), and over each chunk 32 channels at a time: the block's
// chunk of activations and the channels' chunk of weights stay in L2 while they are read again and again. A step's
// epilogue (bias, GELU, BF16 or F32 out, on AVX-512) runs a row at a time between the next step's tile products, so
// the vector units work while the tile unit does.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/amx_tiles.h"
#include "kernels/x86/gemm_bf16.h"

#include "ggml.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>


namespace mllama {

namespace gemm {
namespace {

constexpr int k_step = 2 * amx::k_tile_rows;  // tokens per step: two A tiles
// Tokens per block and k pairs per chunk: the block's chunk of BF16 activations (256 x 1280 x 2 bytes = 640 KiB)
// and the 32 channels' chunk of weights (80 KiB) stay in a 2 MiB L2 while every step reads them from there. On the
// 2-core AMX Xeon of bench/README.md (2026-12-06), one thread, a harness of the step loop alone: K = 1280 at blocks
// of 32 / 128 / 256 / 512 tokens 0.68 / 1.03 / 1.19 / 1.13 TFLOPS; K = 5120 at 256 tokens, chunks of 512 / 1024 /
// 1280 / 2560 / 5120 k 1.02 / 1.17 / 1.15 / 1.00 / 0.72 TFLOPS. bench/amx_sweep.sh times others (-D at build time).
#ifndef MLLAMA_AMX_GEMM_BLOCK_TOKENS
#define MLLAMA_AMX_GEMM_BLOCK_TOKENS 256
#endif
#ifndef MLLAMA_AMX_GEMM_CHUNK_PAIRS
#define MLLAMA_AMX_GEMM_CHUNK_PAIRS 640
#endif
constexpr int64_t k_block_tokens = MLLAMA_AMX_GEMM_BLOCK_TOKENS;
constexpr int64_t k_chunk_pairs = MLLAMA_AMX_GEMM_CHUNK_PAIRS;
static_assert(k_block_tokens % k_step == 0 && k_chunk_pairs % amx::k_tile_rows == 0, "whole steps, whole tiles");
constexpr int64_t k_a_tile_bytes = amx::k_tile_rows * amx::k_tile_bytes;  // one packed A tile
// The most channels whose sums wait in memory between chunks: 2 MiB per thread for a block, whatever M (a
// vocabulary-wide output matrix, sized by M, would ask over 100 MB). A larger M goes in equal groups of at most these.
constexpr int64_t k_sums_channels = 32 * k_panel;

struct aligned_free {
    void operator()(uint8_t * p) const { std::free(p); }
};

struct operands {
    const uint8_t * wp;  // packed weights (all panels)
    const float * bias;  // [M] or null
    char * y;            // dst data
    size_t y_row;        // dst->nb[1]
    int64_t P, M;        // k pairs, output channels
};

// The F32 sums of a finished step waiting for their epilogue: rows tokens from token, nb groups of 16
// channels from channel, at c (row stride c_stride floats); done: rows already finished.
struct pending {
    const float * c = nullptr;
    size_t c_stride = 0;
    int64_t token = 0, channel = 0;
    int rows = 0, nb = 0, done = 0;
};

// The epilogue of up to n more rows of e.
MLLAMA_AVX512_TARGET inline void finish_rows(const operands & o, const epilogue & ep, pending & e, int n) {
    for (const int end = std::min(e.rows, e.done + n); e.done < end; ++e.done) {
        const float * c = e.c + e.done * e.c_stride;
        char * out = o.y + (e.token + e.done) * o.y_row;
        for (int j = 0; j < e.nb; ++j) finish16(_mm512_loadu_ps(c + j * 16), o.bias, ep, out, e.channel + j * 16);
    }
}

// The cache lines a step's epilogue will write: rows tokens from token, nb groups of 16 channels from channel, in
// the output. The epilogue's stores go to lines that are in no cache (a tower GEMM writes 33-66 MB), and a tile load
// waits for the stores before it, so each row's stores held the tile unit for a read of the memory: fetched while the
// step multiplies (a few lines per 16 pairs), the epilogue one step later finds them in L1 (tests/c/gemm_bf16.cpp,
// 2 threads, 6,432 tokens, F32 out, the 2-core AMX Xeon of bench/README.md: [1280 -> 5120] 45-59 -> 31-33 ms,
// [1280 -> 1280] 9.3-11.9 -> 8.5-9.0, [5120 -> 1280] 42-47 -> 41-43; PREFETCHW instead, no different).
struct output_lines {
    const char * first = nullptr;  // the first line
    size_t row_bytes = 0;
    int rows = 0, per_row = 0;
    output_lines() = default;
    output_lines(const operands & o, const epilogue & ep, int64_t token, int64_t channel, int rows_, int nb)
        : row_bytes(o.y_row), rows(rows_) {
        const size_t elem = ep.bf16_out ? sizeof(uint16_t) : sizeof(float);
        const char * start = o.y + token * o.y_row + channel * elem;
        first = start - reinterpret_cast<uintptr_t>(start) % k_cache_line;
        per_row = static_cast<int>((start + nb * 16 * elem - first + k_cache_line - 1) / k_cache_line);
    }
    int count() const { return rows * per_row; }
    // Lines from..from + n - 1 (row by row) into L1, to be written (PREFETCHT0 where the target has no PREFETCHW);
    // returns the next line's index. Inlined always: GCC 12 takes a function of prefetches alone for one without
    // side effects and drops the calls.
    __attribute__((always_inline)) int fetch(int from, int n) const {
        const int end = std::min(count(), from + n);
        for (int i = from; i < end; ++i)
            __builtin_prefetch(first + (i / per_row) * row_bytes + (i % per_row) * k_cache_line, 1, 3);
        return std::max(from, end);
    }
};

// Tiles: C(i, j) = tmm(2 i + j) for tokens 16 i.. and channels 16 j..; A(i) = tmm(4 + i); B(j) = tmm(6 + j).
// a: the step's A tiles for its chunk of k pairs, in order (pack_block), wp: the panel's pair row of the chunk's
// first pair at channel group g (stride wp_stride bytes), pairs: the chunk's (a multiple of 16). The C tiles
// start from zero (first chunk) or from c, and end in c [32 tokens][c_stride floats]. The previous step's
// epilogue (prev) runs a few rows per 16 pairs, between the tile products, and the lines this step's own epilogue
// will write (ahead) are fetched a few per 16 pairs. NB: B tiles (1 or 2).
template <class Tiles, int NB>
MLLAMA_AMX_TARGET void step(const uint8_t * a, const uint8_t * wp, size_t wp_stride, int64_t pairs, bool first,
                            float * c, size_t c_stride, const operands & o, const epilogue & ep, pending & prev,
                            const output_lines & ahead) {
    const size_t c_bytes = c_stride * sizeof(float);
    float * c_low = c + amx::k_tile_rows * c_stride;  // tokens 16..31
    if (first) {
        Tiles::template zero<0>();
        Tiles::template zero<2>();
        if constexpr (NB == 2) Tiles::template zero<1>(), Tiles::template zero<3>();
    } else {
        Tiles::template load<0>(c, c_bytes);
        Tiles::template load<2>(c_low, c_bytes);
        if constexpr (NB == 2) Tiles::template load<1>(c + 16, c_bytes), Tiles::template load<3>(c_low + 16, c_bytes);
    }
    const int64_t iters = pairs / amx::k_tile_rows;
    const int rows_per_iter = static_cast<int>((prev.rows - prev.done + iters - 1) / iters);
    const int lines_per_iter = static_cast<int>((ahead.count() + iters - 1) / iters);
    int fetched = 0;
    for (int64_t p = 0; p < pairs; p += amx::k_tile_rows, a += 2 * k_a_tile_bytes) {
        fetched = ahead.fetch(fetched, lines_per_iter);
        const uint8_t * b = wp + p * wp_stride;
        Tiles::template load<4>(a, amx::k_tile_bytes);
        Tiles::template load<5>(a + k_a_tile_bytes, amx::k_tile_bytes);
        Tiles::template load<6>(b, wp_stride);
        Tiles::template dot_bf16<0, 4, 6>();
        Tiles::template dot_bf16<2, 5, 6>();
        if constexpr (NB == 2) {
            Tiles::template load<7>(b + amx::k_tile_bytes, wp_stride);
            Tiles::template dot_bf16<1, 4, 7>();
            Tiles::template dot_bf16<3, 5, 7>();
        }
        finish_rows(o, ep, prev, rows_per_iter);
    }
    finish_rows(o, ep, prev, prev.rows);
    Tiles::template store<0>(c, c_bytes);
    Tiles::template store<2>(c_low, c_bytes);
    if constexpr (NB == 2) Tiles::template store<1>(c + 16, c_bytes), Tiles::template store<3>(c_low + 16, c_bytes);
}

// Tokens 0..n_tok-1 of a block (rows of x at xb, x_row bytes apart), k pairs p0..p0 + pairs - 1, as A tiles in the
// order the steps read them: out[step][pairs / 16][two tiles: tokens 0..15, 16..31][16 rows][64 bytes], rows past
// n_tok zero. Contiguous and 64-byte aligned, each tile row one cache line (the tensor's rows may sit on 32-byte
// boundaries), and written once per block and chunk for the M / 32 steps that read it.
MLLAMA_AVX512_TARGET void pack_block(const uint8_t * xb, size_t x_row, int64_t n_tok, int64_t p0, int64_t pairs,
                                     uint8_t * out) {
    const int64_t groups = pairs / amx::k_tile_rows, n_steps = (n_tok + k_step - 1) / k_step;
    for (int64_t t = 0; t < n_steps * k_step; ++t) {
        const uint8_t * row = t < n_tok ? xb + t * x_row + p0 * 4 : nullptr;  // null: a zero row past the tokens
        uint8_t * dst = out + (t / k_step) * groups * 2 * k_a_tile_bytes + (t % k_step) * amx::k_tile_bytes;
        for (int64_t q = 0; q < groups; ++q) {
            const __m512i v = row ? _mm512_loadu_si512(row + q * amx::k_tile_bytes) : _mm512_setzero_si512();
            _mm512_store_si512(dst + q * 2 * k_a_tile_bytes, v);  // tokens 16..31 fall in the second tile
        }
    }
}

// What a thread keeps between steps: two step buffers (one step's sums wait for their epilogue while the next
// step fills the other), the sums of a block across chunks (K longer than a chunk), the block's chunk of A tiles
// (its last partial step padded with zero rows), and the pending epilogue.
struct thread_state {
    alignas(64) float c[2][k_step * 32];
    line_vector<float> sums;  // [k_block_tokens][k_sums_channels] where K spans several chunks (2 MiB), kept
    std::unique_ptr<uint8_t[], aligned_free> a;  // a block's chunk of A tiles (pack_block)
    pending prev;
    int64_t n_steps = 0;
};

// Where a step's sums go and which k it covers: the block's first token s0, the channel group's first channel c0
// (the sums hold k_sums_channels from there), the chunk's k pairs p0..p0 + pairs - 1.
struct chunk_pos {
    int64_t s0, c0, p0, pairs;
};

// One step: tokens t0..t0 + rows - 1 (their A tiles at a) against 32 channels from channel group g of a panel,
// over the chunk's k pairs. The last chunk's sums become the pending epilogue (run during the next step).
template <class Tiles>
MLLAMA_AMX_TARGET void block_step(const operands & o, const epilogue & ep, thread_state & ts, const uint8_t * a,
                                  int64_t t0, int rows, int64_t panel, int64_t g, const chunk_pos & at) {
    const int64_t groups = panel_groups(o.M, panel), channel = panel * k_panel + g * 16;
    const uint8_t * wp = o.wp + panel * k_panel * o.P * 4 + g * amx::k_tile_bytes;  // full panels before this one
    const size_t wp_stride = static_cast<size_t>(groups) * amx::k_tile_bytes;
    const int nb = groups - g >= 2 ? 2 : 1;
    const bool chunked = at.pairs < o.P, last = at.p0 + at.pairs == o.P;
    float * c = chunked ? ts.sums.data() + (t0 - at.s0) * k_sums_channels + (channel - at.c0)
                        : ts.c[ts.n_steps++ & 1];
    const size_t c_stride = chunked ? static_cast<size_t>(k_sums_channels) : 32;
    const uint8_t * b = wp + at.p0 * wp_stride;
    const output_lines ahead = last ? output_lines(o, ep, t0, channel, rows, nb) : output_lines();
    if (nb == 2) step<Tiles, 2>(a, b, wp_stride, at.pairs, at.p0 == 0, c, c_stride, o, ep, ts.prev, ahead);
    else step<Tiles, 1>(a, b, wp_stride, at.pairs, at.p0 == 0, c, c_stride, o, ep, ts.prev, ahead);
    if (last) ts.prev = pending{c, c_stride, t0, channel, rows, nb, 0};
}

// Tokens n0..n1-1 (n0 a multiple of 32) in blocks; over a block, where K spans several chunks, channels in groups of
// at most k_sums_channels (the sums of a chunk wait in memory only for those), each chunk of k packed (pack_block)
// and multiplied by the group's panels; else all panels at once, the block packed once.
template <class Tiles>
MLLAMA_AMX_TARGET void run(const operands & o, const ggml_tensor * x, int64_t n0, int64_t n1, const epilogue & ep) {
    const int64_t n_panels = (o.M + k_panel - 1) / k_panel, max_panels = k_sums_channels / k_panel;
    const bool chunked = o.P > k_chunk_pairs;
    const int64_t n_groups = chunked ? (n_panels + max_panels - 1) / max_panels : 1;
    const int64_t group_panels = (n_panels + n_groups - 1) / n_groups;
    static thread_local thread_state ts;
    ts.prev = pending{};
    if (chunked) ts.sums.resize(static_cast<size_t>(k_block_tokens * k_sums_channels));
    if (!ts.a) ts.a.reset(static_cast<uint8_t *>(std::aligned_alloc(64, k_block_tokens * k_chunk_pairs * 4)));
    amx::tile_scope<Tiles> scope(amx::k_full_tiles);
    for (int64_t b0 = n0; b0 < n1; b0 += k_block_tokens) {
        const int64_t n_tok = std::min(n1 - b0, k_block_tokens);
        const auto * xb = static_cast<const uint8_t *>(x->data) + b0 * x->nb[1];
        if (!chunked) pack_block(xb, x->nb[1], n_tok, 0, o.P, ts.a.get());  // one chunk: packed once per block
        for (int64_t pg = 0; pg < n_panels; pg += group_panels) {
            for (int64_t p0 = 0; p0 < o.P; p0 += k_chunk_pairs) {
                const chunk_pos at{b0, pg * k_panel, p0, std::min(k_chunk_pairs, o.P - p0)};
                if (chunked) pack_block(xb, x->nb[1], n_tok, p0, at.pairs, ts.a.get());
                for (int64_t panel = pg; panel < std::min(n_panels, pg + group_panels); ++panel) {
                    for (int64_t g = 0; g < panel_groups(o.M, panel); g += 2) {
                        for (int64_t t = 0; t < n_tok; t += k_step) {
                            const int rows = static_cast<int>(std::min<int64_t>(k_step, n_tok - t));
                            block_step<Tiles>(o, ep, ts, ts.a.get() + t * at.pairs * 4, b0 + t, rows, panel, g, at);
                        }
                    }
                }
            }
            finish_rows(o, ep, ts.prev, ts.prev.rows);  // before the next group or block reuses the sums
        }
    }
}

}  // namespace

void gemm_tiles(ggml_tensor * dst, int ith, int nth, const epilogue & ep) {
    const ggml_tensor * x = dst->src[1];
    const ggml_tensor * bias = dst->src[2];
    const int64_t N = x->ne[1];
    const operands o{reinterpret_cast<const uint8_t *>(aligned_panels(dst->src[0]->data)),
                     bias ? static_cast<const float *>(bias->data) : nullptr, static_cast<char *>(dst->data),
                     dst->nb[1], x->ne[0] / 2, dst->ne[0]};
    // tokens split in whole steps, so only the last thread has a partial one
    const int64_t steps = (N + k_step - 1) / k_step, per_thread = (steps + nth - 1) / nth;
    const int64_t n0 = std::min(N, per_thread * ith * k_step), n1 = std::min(N, n0 + per_thread * k_step);
    if (n0 >= n1) return;
    if (amx_tiles_emulated()) run<amx::emulated_tiles>(o, x, n0, n1, ep);
    else run<amx::hw_tiles>(o, x, n0, n1, ep);
}

}  // namespace gemm
}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
