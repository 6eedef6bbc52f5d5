// ref: transformers 5.23.0 models/mllama/modeling_mllama.py MllamaTextModel.forward and llama-models
// 0.3.0 llama_models/llama3/multimodal/model.py CrossAttentionTransformerBlock (Meta: rows before the
// first image get nothing from a cross-attention layer: attention AND MLP branches are zeroed).
#include "graph/decoder.h"

#include "graph/cross_kv.h"
#include "graph/ops.h"
#include "kernels/dispatch.h"
#include "runtime/backend.h"
#include "model/model.h"
#include "runtime/context.h"

#include "ggml.h"

#include <cmath>
#include <cstdio>

namespace mllama {

// Prefill's products of the other text matrices on AMX tiles: BF16 ones as they are, quantized ones (Q6_K, Q8_0,
// Q4_K in the file layout...) decoded to BF16 by ggml's own decoding once per graph run (as the cross-attention
// K/V of an image, graph/cross_kv.cpp), then the tile GEMM; from as many rows as the Q4_K tile product (a Q6_K that
// the Q6_K tile product cannot take, which our Q6_K kernel takes below that, from k_q6k_decoded_min_rows), K % 32 == 0
// for the tiles. The decoded copy and the
// GEMM's packed panels live in the compute buffer: k_prefill_decode_max_bytes bounds them. F16 matrices keep
// ggml's product (BF16 would round their weights).
static bool prefill_on_tiles(cpu_kernel_set kernels, const ggml_tensor * w, const ggml_tensor * x) {
    const bool bf16 = w->type == GGML_TYPE_BF16 && bf16_linear_supported(w);
    const bool q6k_kernel = kernels.may_run(cpu_kernel::qmm) && q6k_matmul_supported(w, x);
    return x->ne[1] >= (q6k_kernel ? k_q6k_decoded_min_rows : k_q4k_tiles_min_rows) && w->ne[0] % 32 == 0 &&
           (bf16 || dequantize_bf16_supported(w)) && 2 * ggml_nelements(w) <= k_prefill_decode_max_bytes;
}

// w x^T: on AMX tiles from k_q4k_tiles_min_rows rows (prefill: repacked Q4_K and Q6_K by our tile products, BF16
// and other quantized types by the tile GEMM), else our Q6_K and Q4_K kernels where they may run (every batch:
// decode in one pass over the weights, prefill in passes over L2-sized chunks), else ggml's mul_mat (other weight
// types).
static ggml_tensor * text_matmul(ggml_context * ctx, cpu_kernel_set kernels, ggml_tensor * w, ggml_tensor * x) {
    if (kernels.may_run(cpu_kernel::amx) && q4k_tiles_supported(w, x)) return q4k_matmul_tiles(ctx, w, x);  // [M, n]
    if (kernels.may_run(cpu_kernel::amx) && q6k_tiles_supported(w, x)) return q6k_matmul_tiles(ctx, w, x);  // [M, n]
    if (kernels.may_run(cpu_kernel::amx) && prefill_on_tiles(kernels, w, x)) {
        ggml_tensor * w_bf16 = w->type == GGML_TYPE_BF16 ? w : dequantize_bf16(ctx, w, x);  // [K, M]
        return bf16_linear(ctx, w_bf16, x, /*bias=*/nullptr, /*gelu=*/false, /*bf16_out=*/false, /*tiles=*/true);
    }
    if (kernels.may_run(cpu_kernel::qmm) && q6k_matmul_supported(w, x)) return q6k_matmul(ctx, w, x);  // [M, n]
    if (kernels.may_run(cpu_kernel::qmm) && q4k_matmul_supported(w, x)) return q4k_matmul(ctx, w, x);  // [M, n]
    return ggml_mul_mat(ctx, w, x);  // [M, n]
}

static ggml_tensor * ffn(ggml_context * ctx, cpu_kernel_set kernels, const ffn_w & w, ggml_tensor * x) {
    ggml_tensor * g = nullptr, * u = nullptr;
    if (w.gate_up.w && kernels.may_run(cpu_kernel::fuse)) {  // one product, its two halves viewed
        ggml_tensor * gu = text_matmul(ctx, kernels, w.gate_up.w, x);  // [2 n_ff, n]
        const int64_t n_ff = w.gate->ne[1];
        g = ggml_view_2d(ctx, gu, n_ff, gu->ne[1], gu->nb[1], 0);                     // [n_ff, n]
        u = ggml_view_2d(ctx, gu, n_ff, gu->ne[1], gu->nb[1], n_ff * sizeof(float));  // [n_ff, n]
    } else {
        g = text_matmul(ctx, kernels, w.gate, x);  // [n_ff, n]
        u = text_matmul(ctx, kernels, w.up, x);    // [n_ff, n]
    }
    return text_matmul(ctx, kernels, w.down, ggml_mul(ctx, ggml_silu(ctx, g), u));  // [n_embd, n]
}

// Our attention kernel over F16 caches (kernels/dispatch.h's cache_attention: each K/V row read once for the whole
// query group, F32 sums; ggml's CPU flash attention reads them once per query head, F16 dot products: 3.5x our time
// at 4K cached tokens on Zen 3, 9-16x at 16K, bench/README.md "Long contexts") where the layer may use it, else
// null.
static ggml_tensor * kernel_attention(ggml_context * ctx, cpu_kernel_set kernels, ggml_tensor * q, ggml_tensor * k,
                                      ggml_tensor * v, ggml_tensor * mask, float scale) {
    if (!kernels.may_run(cpu_kernel::xattn) || !cache_attention_supported(q, k, v, mask)) return nullptr;
    return cache_attention(ctx, q, k, v, mask, scale, /*tiles=*/false);  // [hd * H, n]
}

// The attention of a group of one-token parts (batch rows first_row..) over their sequences' caches at once: the
// caches as a strided view (cells seq * n_ctx + 0..n_kv - 1 of each part's sequence), each row's mask hiding the
// cells past its own (ggml's CPU attention skips a hidden cell, so each row's result is what an attention over its
// own cells alone gives; our kernel reads each row's own sequence only).
static ggml_tensor * group_attention(ggml_context * ctx, const mllama_context & c, cpu_kernel_set kernels,
                                     const attention_group & g, int64_t first_row, int32_t first_seq, ggml_tensor * q,
                                     ggml_tensor * ck, ggml_tensor * cv, ggml_tensor * mask, float scale) {
    const text_hparams & hp = c.model->hp.text;
    const int64_t hd = hp.n_embd_head, n = static_cast<int64_t>(g.n_parts);
    ggml_tensor * rows = ggml_view_3d(ctx, q, hd, q->ne[1], n, q->nb[1], q->nb[2], first_row * q->nb[2]);  // [hd, H, n]
    const cache_strides st = strides_of(ck, c.state.self_head_major);
    const size_t seq_bytes = static_cast<size_t>(c.params.n_ctx) * st.row;  // from a sequence's cells to the next's
    auto per_row = [&](ggml_tensor * cache) {  // [hd, Hkv, n_kv, n]: row r reads its own sequence's cells
        return ggml_view_4d(ctx, cache, hd, hp.n_head_kv, g.n_kv, n, st.head, st.row, g.seq_step * seq_bytes,
                            first_seq * seq_bytes);
    };
    ggml_tensor * mask_rows = ggml_reshape_2d(ctx, mask, g.n_kv, n);  // [n_kv, n]
    if (ggml_tensor * ours = kernel_attention(ctx, kernels, rows, per_row(ck), per_row(cv), mask_rows, scale)) {
        return ours;  // [hd * H, n]
    }
    rows = ggml_permute(ctx, ggml_reshape_4d(ctx, rows, hd, q->ne[1], 1, n), 0, 2, 1, 3);  // [hd, 1, H, n]
    auto caches = [&](ggml_tensor * cache) {  // [hd, n_kv, Hkv, n]
        return ggml_view_4d(ctx, cache, hd, g.n_kv, hp.n_head_kv, n, st.row, st.head, g.seq_step * seq_bytes,
                            first_seq * seq_bytes);
    };
    ggml_tensor * out = ggml_flash_attn_ext(ctx, rows, caches(ck), caches(cv), mask, scale, /*max_bias=*/0.0f,
                                            /*logit_softcap=*/0.0f);  // [hd, H, 1, n]
    ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32);
    return ggml_reshape_2d(ctx, out, out->ne[0] * out->ne[1], n);  // [hd * H, n]
}

// Writes the batch's new K/V rows into their cache cells (one set_rows per cache) and attends each attention group's
// queries over its sequences' cells; the outputs in batch order.
static ggml_tensor * cached_attention(ggml_context * ctx, const mllama_context & c, int il, ggml_tensor * q,
                                      ggml_tensor * k, ggml_tensor * v, const text_shape & s, const text_inputs & in,
                                      ggml_cgraph * gf) {
    const cpu_kernel_set kernels = layer_kernels(c, static_cast<size_t>(il));
    const text_hparams & hp = c.model->hp.text;
    const int64_t hd = hp.n_embd_head, n_kv_embd = hd * hp.n_head_kv;
    ggml_tensor * ck = c.state.self_k[il], * cv = c.state.self_v[il];
    auto store = [&](ggml_tensor * cache, ggml_tensor * t) {  // t [hd, Hkv, n] with contiguous heads
        if (c.state.self_head_major) {  // cache [hd, n_cells, Hkv]: each head's row into its plane
            ggml_tensor * rows = ggml_permute(ctx, t, 0, 2, 1, 3);  // [hd, n, Hkv]
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, cache, rows, in.kv_cells));
            return;
        }
        ggml_tensor * rows = ggml_view_2d(ctx, t, n_kv_embd, s.n_tokens, t->nb[2], 0);  // [hd * Hkv, n]
        ggml_tensor * cells = ggml_reshape_2d(ctx, cache, n_kv_embd, cache->ne[2]);  // [hd * Hkv, n_cells]
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, cells, rows, in.kv_cells));
    };
    store(ck, k);
    store(cv, v);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    ggml_tensor * a = nullptr;
    for (size_t ig = 0; ig < s.groups->size(); ++ig) {
        const attention_group & g = (*s.groups)[ig];
        const batch_part & p = (*s.parts)[g.first_part];
        ggml_tensor * part = nullptr;
        if (g.one_token) {
            part = group_attention(ctx, c, kernels, g, p.first_row, p.seq, q, ck, cv, in.kq_masks[ig],
                                   scale);  // [n_embd, n]
        } else {
            auto cells = [&](ggml_tensor * cache) {  // [hd, Hkv, n_kv]
                const int64_t cell = static_cast<int64_t>(p.seq) * c.params.n_ctx;
                return cache_rows(ctx, cache, c.state.self_head_major, cell, g.n_kv);
            };
            ggml_tensor * rows = ggml_view_3d(ctx, q, q->ne[0], q->ne[1], p.n_tokens, q->nb[1], q->nb[2],
                                              p.first_row * q->nb[2]);  // [hd, H, n_part]
            part = kernel_attention(ctx, kernels, rows, cells(ck), cells(cv), in.kq_masks[ig], scale);
            if (!part) part = attention(ctx, {rows, cells(ck), cells(cv), in.kq_masks[ig], scale});  // [n_embd, n_part]
        }
        a = a ? ggml_concat(ctx, a, part, 1) : part;  // [n_embd, rows so far]
    }
    return a;
}

// ref: MllamaTextSelfAttention.forward: llama3 RoPE (NEOX order), GQA, KV cache.
static ggml_tensor * self_attention(ggml_context * ctx, const mllama_context & c, int il, ggml_tensor * x,
                                    const text_shape & s, const text_inputs & in, ggml_cgraph * gf,
                                    const char * prefix) {
    const mllama_model & m = *c.model;
    const text_hparams & hp = m.hp.text;
    const self_attn_w & w = m.text.layers[il].self;
    const int64_t hd = hp.n_embd_head, n = s.n_tokens;
    ggml_tensor * factors = m.text.rope_freqs ? m.text.rope_freqs : c.state.rope_factors;
    // llama3 scaling is in the frequency factors: no linear or YaRN scaling on top
    const float freq_scale = 1.0f, ext_factor = 0.0f, attn_factor = 1.0f, beta_fast = 0.0f, beta_slow = 0.0f;
    const int mode = hp.rope_neox ? GGML_ROPE_TYPE_NEOX : GGML_ROPE_TYPE_NORMAL;
    auto rope = [&](ggml_tensor * t) {
        return ggml_rope_ext(ctx, t, in.pos, factors, static_cast<int>(hd), mode, static_cast<int>(hp.rope_orig_ctx),
                             hp.rope_freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow);
    };
    const cpu_kernel_set kernels = layer_kernels(c, static_cast<size_t>(il));
    auto mm = [&](ggml_tensor * weight, ggml_tensor * in_rows) { return text_matmul(ctx, kernels, weight, in_rows); };
    // q, k (and v) in one product where the model holds them fused: views of its rows
    const int n_fused = w.qkv.w && kernels.may_run(cpu_kernel::fuse) ? w.qkv.n_parts : 0;
    ggml_tensor * qkv = n_fused ? mm(w.qkv.w, x) : nullptr;  // [n_q + n_kv (+ n_kv), n]
    auto heads = [&](int part, ggml_tensor * weight, int64_t first, int64_t n_heads) {  // [hd, n_heads, n]
        if (part >= n_fused) return ggml_reshape_3d(ctx, mm(weight, x), hd, n_heads, n);
        return ggml_view_3d(ctx, qkv, hd, n_heads, n, hd * sizeof(float), qkv->nb[1], first * sizeof(float));
    };
    const int64_t n_q = hd * hp.n_head, n_kv = hd * hp.n_head_kv;
    ggml_tensor * q = rope(heads(0, w.wq, 0, hp.n_head));                // [hd, H, n]
    ggml_tensor * k = rope(heads(1, w.wk, n_q, hp.n_head_kv));           // [hd, Hkv, n]
    ggml_tensor * v = heads(2, w.wv, n_q + n_kv, hp.n_head_kv);          // [hd, Hkv, n]
    ggml_tensor * a = cached_attention(ctx, c, il, q, k, v, s, in, gf);  // [n_embd, n]
    return named(mm(w.wo, a), prefix, "attn_out");
}

// ref: MllamaTextCrossAttention.forward: q_norm/k_norm over the head dim, no RoPE, GQA.
static ggml_tensor * cross_attention(ggml_context * ctx, const mllama_context & c, int il, int cross_index,
                                     ggml_tensor * x, const text_shape & s, const text_inputs & in,
                                     const char * prefix) {
    const mllama_model & m = *c.model;
    const text_hparams & hp = m.hp.text;
    const cross_attn_w & w = m.text.layers[il].cross;
    const int64_t hd = hp.n_embd_head;
    const cpu_kernel_set kernels = layer_kernels(c, static_cast<size_t>(il));
    ggml_tensor * q = text_matmul(ctx, kernels, w.wq, x);  // [n_embd, n]
    q = ggml_reshape_3d(ctx, q, hd, hp.n_head, s.n_tokens);  // [hd, H, n]
    q = rms_norm(ctx, q, w.q_norm, hp.rms_norm_eps);
    const int64_t n_vis = c.state.n_vis;
    const slot_span span = s.slots;
    const bool head_major = c.state.cross_head_major;
    ggml_tensor * keys = slot_view(ctx, c.state.cross_k[cross_index], head_major, n_vis, span.first,
                                   span.count);  // [hd, Hkv, span.count * n_vis]
    ggml_tensor * vals = slot_view(ctx, c.state.cross_v[cross_index], head_major, n_vis, span.first, span.count);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    // our kernel for every batch, prefill's too (1.7-2.0x ggml's flash attention at 64 tokens, 2.1-2.5x at 200)
    const bool ours = kernels.may_run(cpu_kernel::xattn) && cache_attention_supported(q, keys, vals, in.x_mask);
    ggml_tensor * a = ours ? cache_attention(ctx, q, keys, vals, in.x_mask, scale,
                                             kernels.may_run(cpu_kernel::amx))  // [n_embd, n]
                           : attention(ctx, {q, keys, vals, in.x_mask, scale});
    a = named(text_matmul(ctx, kernels, w.wo, a), prefix, "cross_out");
    return ggml_mul(ctx, a, in.x_rows);  // rows with no image receive nothing (Meta)
}

static void new_inputs(ggml_context * ctx, const mllama_context & c, const text_shape & s, text_inputs & in) {
    const int64_t n = s.n_tokens;
    in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    in.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    in.out_rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, s.n_out);
    for (ggml_tensor * t : {in.tokens, in.pos, in.out_rows}) ggml_set_input(t);
    in.kq_masks.clear();
    for (const attention_group & g : *s.groups) {  // one-token groups: [n_kv, 1, 1, n_parts] (ggml's 4D attention)
        const batch_part & p = (*s.parts)[g.first_part];
        in.kq_masks.push_back(g.one_token ? ggml_new_tensor_4d(ctx, GGML_TYPE_F16, g.n_kv, 1, 1, g.n_parts)
                                          : ggml_new_tensor_2d(ctx, GGML_TYPE_F16, g.n_kv, p.n_tokens));
        ggml_set_input(in.kq_masks.back());
    }
    in.kv_cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
    ggml_set_input(in.kv_cells);
    if (s.slots.count > 0) {
        in.x_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, s.slots.count * c.state.n_vis, n);
        in.x_rows = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n);
        ggml_set_input(in.x_mask);
        ggml_set_input(in.x_rows);
    }
}

// ref: MllamaCrossAttentionDecoderLayer.forward: tanh-gated attention and MLP branches.
static ggml_tensor * cross_layer(ggml_context * ctx, const mllama_context & c, int il, int cross_index, ggml_tensor * h,
                                 const text_shape & s, const text_inputs & in, const char * prefix) {
    const text_hparams & hp = c.model->hp.text;
    const text_layer_w & l = c.model->text.layers[il];
    ggml_tensor * x = rms_norm(ctx, h, l.attn_norm, hp.rms_norm_eps);
    ggml_tensor * a = cross_attention(ctx, c, il, cross_index, x, s, in, prefix);
    h = ggml_add(ctx, h, ggml_scale(ctx, a, l.cross.attn_gate_tanh));
    ggml_tensor * x_ffn = rms_norm(ctx, h, l.ffn_norm, hp.rms_norm_eps);
    ggml_tensor * f = ggml_mul(ctx, ffn(ctx, layer_kernels(c, static_cast<size_t>(il)), l.ffn, x_ffn), in.x_rows);
    return named(ggml_add(ctx, h, ggml_scale(ctx, f, l.cross.mlp_gate_tanh)), prefix, "out");  // [n_embd, n]
}

// ref: MllamaSelfAttentionDecoderLayer.forward
static ggml_tensor * self_layer(ggml_context * ctx, const mllama_context & c, int il, ggml_tensor * h,
                                const text_shape & s, const text_inputs & in, ggml_cgraph * gf, const char * prefix) {
    const text_hparams & hp = c.model->hp.text;
    const text_layer_w & l = c.model->text.layers[il];
    h = ggml_add(ctx, h, self_attention(ctx, c, il, rms_norm(ctx, h, l.attn_norm, hp.rms_norm_eps), s, in, gf, prefix));
    ggml_tensor * x_ffn = rms_norm(ctx, h, l.ffn_norm, hp.rms_norm_eps);
    return named(ggml_add(ctx, h, ffn(ctx, layer_kernels(c, static_cast<size_t>(il)), l.ffn, x_ffn)), prefix, "out");
}

ggml_tensor * build_text(ggml_context * ctx, const mllama_context & c, const text_shape & s, text_inputs & in,
                         ggml_cgraph * gf) {
    const mllama_model & m = *c.model;
    const text_hparams & hp = m.hp.text;
    new_inputs(ctx, c, s, in);
    ggml_tensor * h = named(ggml_get_rows(ctx, m.text.token_embd, in.tokens), "", "t.embd");  // [n_embd, n]
    char prefix[32];
    int cross_index = -1;
    for (int il = 0; il < hp.n_layer; ++il) {
        std::snprintf(prefix, sizeof(prefix), "t.blk.%d", il);
        if (!m.text.layers[il].is_cross) {
            h = self_layer(ctx, c, il, h, s, in, gf, prefix);
            continue;
        }
        ++cross_index;
        if (s.slots.count > 0) h = cross_layer(ctx, c, il, cross_index, h, s, in, prefix);  // text only: skipped entirely
    }
    h = ggml_get_rows(ctx, h, in.out_rows);                                        // [n_embd, n_out]
    h = rms_norm(ctx, h, m.text.output_norm, hp.rms_norm_eps);
    const cpu_kernel_set output_kernels = layer_kernels(c, m.plan.layers.size() - 1);  // the output's device
    return named(text_matmul(ctx, output_kernels, m.text.output, h), "", "t.logits");  // [n_vocab, n_out]
}

}  // namespace mllama
