#include "graph/ops.h"

#include "ggml.h"


namespace mllama {

ggml_tensor * named(ggml_tensor * t, const char * prefix, const char * name) {
    if (prefix && *prefix) ggml_format_name(t, "%s.%s", prefix, name);
    else ggml_set_name(t, name);
    return t;
}

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, const norm_w & n, float eps) {
    x = ggml_norm(ctx, x, eps);
    x = ggml_mul(ctx, x, n.w);
    return n.b ? ggml_add(ctx, x, n.b) : x;
}

ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weight, float eps) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), weight);
}

ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, const linear_w & l) {
    ggml_tensor * y = ggml_mul_mat(ctx, l.w, x);
    return l.b ? ggml_add(ctx, y, l.b) : y;
}

ggml_tensor * attention(ggml_context * ctx, const attn_args & a) {
    ggml_tensor * q = ggml_permute(ctx, a.q, 0, 2, 1, 3);  // [head_dim, n_q, n_head]
    ggml_tensor * k = ggml_permute(ctx, a.k, 0, 2, 1, 3);  // [head_dim, n_kv, n_head_kv]
    ggml_tensor * v = ggml_permute(ctx, a.v, 0, 2, 1, 3);  // [head_dim, n_kv, n_head_kv]
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, a.mask, a.scale, /*max_bias=*/0.0f,
                                            /*logit_softcap=*/0.0f);  // [head_dim, n_head, n_q]
    ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32);
    return ggml_reshape_2d(ctx, out, out->ne[0] * out->ne[1], out->ne[2]);  // [head_dim * n_head, n_q]
}

cache_strides strides_of(const ggml_tensor * cache, bool head_major) {
    return head_major ? cache_strides{cache->nb[1], cache->nb[2]} : cache_strides{cache->nb[2], cache->nb[1]};
}

ggml_tensor * cache_rows(ggml_context * ctx, ggml_tensor * cache, bool head_major, int64_t first, int64_t n) {
    const cache_strides st = strides_of(cache, head_major);
    const int64_t n_head_kv = head_major ? cache->ne[2] : cache->ne[1];
    return ggml_view_3d(ctx, cache, cache->ne[0], n_head_kv, n, st.head, st.row,
                        static_cast<size_t>(first) * st.row);  // [hd, Hkv, n]
}

}  // namespace mllama
