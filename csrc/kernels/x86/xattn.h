// The cross-attention kernel (kernels/dispatch.h's image_cache_attention) shared between its driver
// (kernels/x86/xattn.cpp) and its block step (kernels/x86/xattn_avx2.cpp, AVX2, run on every x86 family):
// each thread takes a range of KV heads of a chunk of tokens (one in decode) and walks their keys in blocks;
// group_block_avx2 does the scores, the online-softmax step and the value sums of one query group of one
// token over one block.
#pragma once

#include "ggml.h"

#include <cstdint>

namespace mllama::xattn {

constexpr int64_t k_block = 64;  // keys per softmax step

struct shape {
    int64_t D, Hq, T, Hkv, n_kv, G;  // head size, query heads, tokens, KV heads, keys, queries per KV head
};

inline shape shape_of(const ggml_tensor * q, const ggml_tensor * k) {
    return {q->ne[0], q->ne[1], q->ne[2], k->ne[1], k->ne[2], q->ne[1] / k->ne[1]};
}

inline const ggml_fp16_t * row_of(const ggml_tensor * t, int64_t h, int64_t j) {  // t: [D, H, n] F16
    return reinterpret_cast<const ggml_fp16_t *>(static_cast<const char *>(t->data) + h * t->nb[1] + j * t->nb[2]);
}

// Running softmax state of one query head.
struct query_state {
    float * q;  // [D] scaled query
    float * o;  // [D] unnormalized output
    float m, l;
};

// Scores, softmax step and value sums of the query group of KV head h (qs: its G heads) over keys
// j0..j0+n; mrow: the token's mask row (-inf: the key is skipped); next_live: which rows of the next block some
// token sees, prefetched into L2 during the scores (once per block for the tokens that walk it together; null: none).
// dst->src = {q, k, v, mask}.
void group_block_avx2(const ggml_tensor * dst, const shape & s, int64_t h, const ggml_fp16_t * mrow, int64_t j0, int64_t n,
                      query_state * qs, const bool * next_live);

}  // namespace mllama::xattn
