// The attention kernel over F16 caches (kernels/dispatch.h's cache_attention) shared between its driver
// (kernels/x86/xattn.cpp) and its block steps, in two forms: AVX-512 (kernels/x86/xattn_avx512.cpp, the
// AVX-512 BF16 family) and AVX2 (kernels/x86/xattn_avx2.cpp, the AVX2 family). Each thread takes KV heads of a
// chunk of tokens (one in decode) and walks their keys in blocks; a block step does the scores, the online-softmax
// step and the value sums of one query group of one token over one block; in the AVX2 family, a chunk of several
// tokens takes all its rows of a KV head at once (kernels/x86/xattn_chunk_avx2.cpp).
#pragma once

#include "kernels/dispatch.h"
#include "kernels/x86/simd_avx2.h"

#include "ggml.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace mllama::xattn {

constexpr int64_t k_block = 64;  // keys per softmax step
// Most tokens that walk the keys together (prefill, decode batches): each key block read from memory once serves
// all of them from L1/L2 instead of each token streaming the cache again.
constexpr int64_t k_token_chunk = 8;
constexpr int64_t k_max_chunk_rows = k_token_chunk * k_xattn_max_group;  // query rows of a chunk and KV head
// Query heads per pass of both forms: one key's scores of a quad fill half a ymm (AVX2), four keys' a zmm (AVX-512).
constexpr int64_t k_quad = 4;
static_assert(k_block % 4 == 0, "the AVX-512 form takes keys in fours");

// The cross-attention on AMX tiles (kernels/x86/xattn_amx.cpp): dst->src = {scaled q, k, v, mask}.
void attend_tiles(ggml_tensor * dst, int ith, int nth);

struct shape {
    int64_t D, Hq, T, Hkv, n_kv, G;  // head size, query heads, tokens, KV heads, keys, queries per KV head
};

inline shape shape_of(const ggml_tensor * q, const ggml_tensor * k) {
    return {q->ne[0], q->ne[1], q->ne[2], k->ne[1], k->ne[2], q->ne[1] / k->ne[1]};
}

inline const ggml_fp16_t * row_of(const ggml_tensor * t, int64_t h, int64_t j) {  // t: [D, H, n] F16
    return reinterpret_cast<const ggml_fp16_t *>(static_cast<const char *>(t->data) + h * t->nb[1] + j * t->nb[2]);
}

// 8 F16 -> 8 F32 (the AVX2 block steps' loads of keys, values and mask biases).
MLLAMA_AVX2_TARGET inline __m256 widen(const ggml_fp16_t * x) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(x)));
}

// Running softmax state of one query head.
struct query_state {
    float * q;  // [D] scaled query
    float * o;  // [D] unnormalized output
    float m, l;
};

// The live keys of one block: their cache indices and mask biases (the AVX-512 form fills a last group of four
// keys with copies of the last live key: k_block is a multiple of 4).
struct live_keys {
    int64_t index[k_block];
    float bias[k_block];
    int64_t n = 0;
};

// Keys j0..j0+n of the mask row that are not -inf (F16C: both forms' targets have it).
__attribute__((target("f16c"))) inline void collect_live(const ggml_fp16_t * mrow, int64_t j0, int64_t n,
                                                        live_keys & keys) {
    keys.n = 0;
    for (int64_t j = j0; j < j0 + n; ++j) {
        const float bias = _cvtsh_ss(mrow[j]);
        if (bias == -std::numeric_limits<float>::infinity()) continue;
        keys.index[keys.n] = j;
        keys.bias[keys.n++] = bias;
    }
}

// The next block's rows of one KV head (K and V) that some token sees, prefetched into L2 a few at a time while
// this block's scores compute: issued all at once (512 lines for a head of 128 channels) they held the core
// until the memory had served most of them, so the block's arithmetic and its successor's reads took turns
// (Zen 4, 2 threads, one token over a 4-tile image: 1.35-1.55 ms per layer -> 1.00-1.19; bench/README.md).
struct next_rows {
    const ggml_tensor * k, * v;
    int64_t h, j0, n;   // rows j0..j0 + n of KV head h
    const bool * live;  // live[i]: some token sees row j0 + i
    int64_t done = 0;   // rows prefetched so far

    void prefetch_until(int64_t end) {  // rows done..end (at most n)
        const int64_t row_bytes = k->ne[0] * static_cast<int64_t>(sizeof(ggml_fp16_t));
        for (end = std::min(end, n); done < end; ++done) {
            if (!live[done]) continue;
            const auto * kr = reinterpret_cast<const char *>(row_of(k, h, j0 + done));
            const auto * vr = reinterpret_cast<const char *>(row_of(v, h, j0 + done));
            for (int64_t line = 0; line < row_bytes; line += 64) {
                _mm_prefetch(kr + line, _MM_HINT_T1);
                _mm_prefetch(vr + line, _MM_HINT_T1);
            }
        }
    }
};

// What both forms' block steps begin with: the block's live keys (keys) and the next block's rows of head h to
// prefetch during the scores (next; none without next_live). A block with no live key prefetches them at once and
// gives false: nothing to compute.
__attribute__((target("f16c"))) inline bool begin_block(const ggml_tensor * dst, const shape & s, int64_t h,
                                                       const ggml_fp16_t * mrow, int64_t j0, int64_t n,
                                                       const bool * next_live, live_keys & keys, next_rows & next) {
    collect_live(mrow, j0, n, keys);
    // the hardware prefetcher alone left the kernel waiting on them (key-major caches: rows 2 KiB apart; head-major
    // ones, Zen 3: 2.1-2.6 against 1.6-2.2 ms for a 4-tile image's layer)
    next = {dst->src[1], dst->src[2], h, j0 + n, next_live ? std::clamp<int64_t>(s.n_kv - j0 - n, 0, n) : 0, next_live};
    if (keys.n > 0) return true;
    next.prefetch_until(next.n);
    return false;
}

// Query heads g0..g0 + k_quad of a group of G (qs), a block step's quad; a missing head's query repeats the first.
struct quad_heads {
    query_state * heads;
    int64_t n_heads;
    const float * q[k_quad];

    quad_heads(query_state * qs, int64_t g0, int64_t G) : heads(qs + g0), n_heads(std::min(k_quad, G - g0)) {
        for (int64_t g = 0; g < k_quad; ++g) q[g] = heads[g < n_heads ? g : 0].q;
    }
};

// Scores, softmax step and value sums of the query group of KV head h (qs: its G heads) over keys
// j0..j0+n; mrow: the token's mask row (-inf: the key is skipped); next_live: which rows of the next block some
// token sees, prefetched into L2 during the scores (once per block for the tokens that walk it together; null: none).
// dst->src = {q, k, v, mask}.
using group_block_fn = void (*)(const ggml_tensor * dst, const shape & s, int64_t h, const ggml_fp16_t * mrow,
                                int64_t j0, int64_t n, query_state * qs, const bool * next_live);
void group_block_avx2(const ggml_tensor * dst, const shape & s, int64_t h, const ggml_fp16_t * mrow, int64_t j0,
                      int64_t n, query_state * qs, const bool * next_live);
void group_block_avx512(const ggml_tensor * dst, const shape & s, int64_t h, const ggml_fp16_t * mrow, int64_t j0,
                        int64_t n, query_state * qs, const bool * next_live);

// The AVX2 family's step for several tokens of a chunk (kernels/x86/xattn_chunk_avx2.cpp): n_rows query rows (rows:
// their states, mrows: each one's mask row) of KV head h over keys j0..j0+n at once; next_live as above.
void chunk_block_avx2(const ggml_tensor * dst, const shape & s, int64_t h, query_state * const * rows,
                      const ggml_fp16_t * const * mrows, int64_t n_rows, int64_t j0, int64_t n, const bool * next_live);

}  // namespace mllama::xattn
