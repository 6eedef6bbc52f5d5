// Small graph helpers shared by the vision, cross-K/V and decoder graphs. ggml order throughout:
// ne[0] is the fastest dimension, and ggml_mul_mat(w, x) computes x @ w.T.
#pragma once

#include "model/weights.h"

struct ggml_context;
struct ggml_tensor;

namespace mllama {

// Name a node "<prefix>.<name>" (or "<name>" without a prefix) for dumps and debugging.
ggml_tensor * named(ggml_tensor * t, const char * prefix, const char * name);

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, const norm_w & n, float eps);
ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weight, float eps);
ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, const linear_w & l);

// Multi-head attention over [n_embd, n_tokens] inputs with flash attention (no score matrix).
struct attn_args {
    ggml_tensor * q;      // [head_dim, n_head, n_q]
    ggml_tensor * k;      // [head_dim, n_head_kv, n_kv]
    ggml_tensor * v;      // [head_dim, n_head_kv, n_kv]
    ggml_tensor * mask;   // [n_kv, n_q] F16 (0 or -inf), or nullptr
    float scale;
};
ggml_tensor * attention(ggml_context * ctx, const attn_args & a);  // -> [head_dim * n_head, n_q]

// A K or V cache tensor holds rows (a key's or value's heads: one per token or vision token) key-major,
// [hd, Hkv, n_rows] (a row's heads adjacent, ggml's usual cache), or head-major, [hd, n_rows, Hkv] (a head's rows
// adjacent: where our attention kernel's AVX2 form reads them faster; runtime/context.h).
struct cache_strides {
    size_t row;   // bytes from one row to the next
    size_t head;  // bytes from one head to the next
};
cache_strides strides_of(const ggml_tensor * cache, bool head_major);

// Rows first .. first + n - 1 of a cache tensor (either layout) as [hd, Hkv, n].
ggml_tensor * cache_rows(ggml_context * ctx, ggml_tensor * cache, bool head_major, int64_t first, int64_t n);

}  // namespace mllama
