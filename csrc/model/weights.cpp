#include "model/weights.h"

#include "common/error.h"
#include "model/placement.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>

namespace mllama {

// ref: transformers 5.23.0 modeling_mllama.py MllamaSelfAttentionDecoderLayer / MllamaCrossAttentionDecoderLayer
static text_layer_w load_text_layer(const text_hparams & hp, tensor_loader & L, ggml_context * ctx, int il) {
    const int64_t n_embd = hp.n_embd, n_q = hp.n_embd_head * hp.n_head, n_kv = hp.n_embd_kv();
    text_layer_w l;
    l.is_cross = hp.is_cross(il);
    l.attn_norm = L.load(ctx, tn::ATTN_NORM, il, {n_embd}, wkind::f32);
    l.ffn_norm = L.load(ctx, tn::FFN_NORM, il, {n_embd}, wkind::f32);
    l.ffn.gate = L.load(ctx, tn::FFN_GATE, il, {n_embd, hp.n_ff}, wkind::matrix);
    l.ffn.up = L.load(ctx, tn::FFN_UP, il, {n_embd, hp.n_ff}, wkind::matrix);
    l.ffn.down = L.load(ctx, tn::FFN_DOWN, il, {hp.n_ff, n_embd}, wkind::matrix);
    if (!l.is_cross) {
        l.self.wq = L.load(ctx, tn::ATTN_Q, il, {n_embd, n_q}, wkind::matrix);
        l.self.wk = L.load(ctx, tn::ATTN_K, il, {n_embd, n_kv}, wkind::matrix);
        l.self.wv = L.load(ctx, tn::ATTN_V, il, {n_embd, n_kv}, wkind::matrix);
        l.self.wo = L.load(ctx, tn::ATTN_OUT, il, {n_q, n_embd}, wkind::matrix);
        return l;
    }
    cross_attn_w & c = l.cross;
    c.wq = L.load(ctx, tn::CROSS_Q, il, {n_embd, n_q}, wkind::matrix);
    c.wk = L.load(ctx, tn::CROSS_K, il, {n_embd, n_kv}, wkind::matrix);
    c.wv = L.load(ctx, tn::CROSS_V, il, {n_embd, n_kv}, wkind::matrix);
    c.wo = L.load(ctx, tn::CROSS_O, il, {n_q, n_embd}, wkind::matrix);
    c.q_norm = L.load(ctx, tn::CROSS_Q_NORM, il, {hp.n_embd_head}, wkind::f32);
    c.k_norm = L.load(ctx, tn::CROSS_K_NORM, il, {hp.n_embd_head}, wkind::f32);
    c.attn_gate = L.load(ctx, tn::CROSS_ATTN_GATE, il, {1}, wkind::f32);
    c.mlp_gate = L.load(ctx, tn::CROSS_MLP_GATE, il, {1}, wkind::f32);
    return l;
}

text_w load_text_weights(const text_hparams & hp, tensor_loader & L, const placement & where) {
    text_w w;
    ggml_context * out_ctx = where.context_for(where.layers.at(static_cast<size_t>(hp.n_layer)));  // the output
    ggml_tensor * embd = L.descriptor(tn::TOKEN_EMBD);
    const int64_t n_vocab_embd = embd ? embd->ne[1] : hp.n_vocab;
    if (n_vocab_embd < hp.n_vocab) {
        fail(MLLAMA_ERR_MODEL, "token_embd.weight has %lld rows, fewer than vocab_size %lld", (long long) n_vocab_embd,
             (long long) hp.n_vocab);
    }
    // The input embedding stays on the CPU (a row lookup), as llama.cpp does.
    w.token_embd = L.load(where.cpu, tn::TOKEN_EMBD, -1, {hp.n_embd, n_vocab_embd}, wkind::matrix);
    w.output_norm = L.load(out_ctx, tn::OUTPUT_NORM, -1, {hp.n_embd}, wkind::f32);
    w.output = L.load(out_ctx, tn::OUTPUT, -1, {hp.n_embd, hp.n_vocab}, wkind::matrix);
    w.rope_freqs = L.load_optional(out_ctx, tn::ROPE_FREQS, -1, {hp.n_embd_head / 2}, wkind::f32);
    for (int il = 0; il < hp.n_layer; ++il) {
        ggml_context * ctx = where.context_for(where.layers.at(static_cast<size_t>(il)));
        w.layers.push_back(load_text_layer(hp, L, ctx, il));
    }
    return w;
}

static vision_layer_w load_vision_layer(const vision_hparams & hp, tensor_loader & L, ggml_context * ctx, int il, bool global) {
    const int64_t d = hp.n_embd;
    vision_layer_w l;
    l.attn_norm.w = L.load(ctx, global ? tn::VG_ATTN_NORM_W : tn::V_ATTN_NORM_W, il, {d}, wkind::f32);
    l.attn_norm.b = L.load(ctx, global ? tn::VG_ATTN_NORM_B : tn::V_ATTN_NORM_B, il, {d}, wkind::f32);
    l.wq = L.load(ctx, global ? tn::VG_ATTN_Q : tn::V_ATTN_Q, il, {d, d}, wkind::matrix);
    l.wk = L.load(ctx, global ? tn::VG_ATTN_K : tn::V_ATTN_K, il, {d, d}, wkind::matrix);
    l.wv = L.load(ctx, global ? tn::VG_ATTN_V : tn::V_ATTN_V, il, {d, d}, wkind::matrix);
    l.wo = L.load(ctx, global ? tn::VG_ATTN_OUT : tn::V_ATTN_OUT, il, {d, d}, wkind::matrix);
    l.ffn_norm.w = L.load(ctx, global ? tn::VG_FFN_NORM_W : tn::V_FFN_NORM_W, il, {d}, wkind::f32);
    l.ffn_norm.b = L.load(ctx, global ? tn::VG_FFN_NORM_B : tn::V_FFN_NORM_B, il, {d}, wkind::f32);
    l.ffn_up.w = L.load(ctx, global ? tn::VG_FFN_UP_W : tn::V_FFN_UP_W, il, {d, hp.n_ff}, wkind::matrix);
    l.ffn_up.b = L.load(ctx, global ? tn::VG_FFN_UP_B : tn::V_FFN_UP_B, il, {hp.n_ff}, wkind::f32);
    l.ffn_down.w = L.load(ctx, global ? tn::VG_FFN_DOWN_W : tn::V_FFN_DOWN_W, il, {hp.n_ff, d}, wkind::matrix);
    l.ffn_down.b = L.load(ctx, global ? tn::VG_FFN_DOWN_B : tn::V_FFN_DOWN_B, il, {d}, wkind::f32);
    if (global) {
        l.attn_gate = L.load(ctx, tn::VG_ATTN_GATE, il, {1}, wkind::f32);
        l.ffn_gate = L.load(ctx, tn::VG_FFN_GATE, il, {1}, wkind::f32);
    }
    return l;
}

// ref: transformers 5.23.0 modeling_mllama.py MllamaVisionModel.__init__ and
// MllamaForConditionalGeneration.__init__ (multi_modal_projector)
vision_w load_vision_weights(const vision_hparams & hp, tensor_loader & L, ggml_context * ctx) {
    const int64_t d = hp.n_embd, n_ar = static_cast<int64_t>(hp.aspect_ratios.size()) + 1;  // row 0: no image
    vision_w w;
    w.patch_embd = L.load(ctx, tn::V_PATCH_EMBD, -1, {hp.patch_size, hp.patch_size, hp.n_channels, d}, wkind::floats);
    w.class_embd = L.load(ctx, tn::V_CLASS_EMBD, -1, {d}, wkind::f32);
    w.pos_embd = L.load(ctx, tn::V_POS_EMBD, -1, {d, hp.n_positions()}, wkind::floats);
    w.pos_gate = L.load(ctx, tn::V_POS_GATE, -1, {1}, wkind::f32);
    w.tile_pos_embd = L.load(ctx, tn::V_TILE_POS_EMBD, -1, {hp.max_tiles * hp.n_positions() * d, n_ar}, wkind::floats);
    // Ollama files also store tanh(g) of the position gate here; the runtime derives it from pos_gate, but
    // the tensor is loaded (and listed) so that it is not reported as unknown.
    L.load_optional(ctx, tn::V_TILE_POS_GATE, -1, {1}, wkind::f32);
    w.pre_tile_embd = L.load(ctx, tn::V_PRE_TILE_EMBD, -1, {hp.max_tiles * d, n_ar}, wkind::floats);
    w.pre_tile_gate = L.load(ctx, tn::V_PRE_TILE_GATE, -1, {1}, wkind::f32);
    w.post_tile_embd = L.load(ctx, tn::V_POST_TILE_EMBD, -1, {hp.max_tiles * d, n_ar}, wkind::floats);
    w.post_tile_gate = L.load(ctx, tn::V_POST_TILE_GATE, -1, {1}, wkind::f32);
    w.pre_ln.w = L.load(ctx, tn::V_PRE_LN_W, -1, {d}, wkind::f32);
    w.pre_ln.b = L.load(ctx, tn::V_PRE_LN_B, -1, {d}, wkind::f32);
    w.post_ln.w = L.load(ctx, tn::V_POST_LN_W, -1, {d}, wkind::f32);
    w.post_ln.b = L.load(ctx, tn::V_POST_LN_B, -1, {d}, wkind::f32);
    for (int il = 0; il < hp.n_layer; ++il) w.layers.push_back(load_vision_layer(hp, L, ctx, il, false));
    for (int il = 0; il < hp.n_global_layer; ++il) w.global_layers.push_back(load_vision_layer(hp, L, ctx, il, true));
    w.projector.w = L.load(ctx, tn::MM_W, -1, {hp.output_dim(), hp.projection_dim}, wkind::matrix);
    w.projector.b = L.load(ctx, tn::MM_B, -1, {hp.projection_dim}, wkind::f32);
    return w;
}

static float gate_tanh(const ggml_tensor * gate) {
    float value = 0.0f;
    ggml_backend_tensor_get(gate, &value, 0, sizeof(value));
    if (!std::isfinite(value)) fail(MLLAMA_ERR_MODEL, "gate '%s' is not finite", ggml_get_name(gate));
    return std::tanh(value);
}

static float gate_value(const ggml_tensor * gate) {
    float value = 0.0f;
    ggml_backend_tensor_get(gate, &value, 0, sizeof(value));
    if (!std::isfinite(value) || value < -1.0f || value > 2.0f) {
        fail(MLLAMA_ERR_MODEL, "gate '%s' = %g is not a stored tanh", ggml_get_name(gate), value);
    }
    return value;
}

void read_gates(text_w & text, vision_w & vision, bool pretanh) {
    auto vision_gate = [&](const ggml_tensor * g) { return pretanh ? gate_value(g) : gate_tanh(g); };
    vision.pos_gate_tanh = pretanh ? 1.0f - gate_value(vision.pos_gate) : gate_tanh(vision.pos_gate);
    vision.pre_tile_gate_tanh = vision_gate(vision.pre_tile_gate);
    vision.post_tile_gate_tanh = vision_gate(vision.post_tile_gate);
    for (vision_layer_w & l : vision.global_layers) {
        l.attn_gate_tanh = vision_gate(l.attn_gate);
        l.ffn_gate_tanh = vision_gate(l.ffn_gate);
    }
    for (text_layer_w & l : text.layers) {
        if (!l.is_cross) continue;
        l.cross.attn_gate_tanh = gate_tanh(l.cross.attn_gate);
        l.cross.mlp_gate_tanh = gate_tanh(l.cross.mlp_gate);
    }
}

}  // namespace mllama
