#include "model/weights.h"

#include "common/error.h"
#include "ggml.h"
#include "gguf/gguf_file.h"
#include "gguf/conventions.h"
#include "common/log.h"
#include "gguf/quant.h"
#include "ggml-backend.h"

#include <cmath>

namespace mllama {

static void check_type(const std::string & name, const ggml_tensor * t, wkind kind) {
    const ggml_type type = t->type;
    const bool is_float = type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16;
    bool ok = false;
    switch (kind) {
        case wkind::f32: ok = type == GGML_TYPE_F32; break;
        case wkind::floats: ok = is_float; break;
        case wkind::matrix: ok = is_weight_type(type) && t->ne[0] % ggml_blck_size(type) == 0; break;
    }
    if (!ok) {
        const char * want = kind == wkind::f32 ? "F32" : kind == wkind::floats ? "F32, F16 or BF16" : "a float or quantized weight type";
        fail(MLLAMA_ERR_UNSUPPORTED, "tensor '%s' has unsupported type %s (expected %s)", name.c_str(), ggml_type_name(type), want);
    }
}

tensor_source tensor_loader::find(const std::string & canonical) const {
    const std::string name = file_tensor_name(conv_, canonical);
    for (const gguf_file * f : files_) {
        if (f->find(name)) return {f, name};
    }
    return {nullptr, name};
}

ggml_tensor * tensor_loader::descriptor(tn id, int layer) const {
    const tensor_source src = find(tensor_name(id, layer));
    return src.file ? src.file->find(src.name) : nullptr;
}

ggml_tensor * tensor_loader::load_optional(ggml_context * ctx, tn id, int layer, std::vector<int64_t> shape, wkind kind) {
    const std::string name = tensor_name(id, layer);
    const tensor_source src = find(name);
    if (!src.file) return nullptr;
    ggml_tensor * meta = src.file->find(src.name);
    long long want[GGML_MAX_DIMS] = {1, 1, 1, 1};
    for (size_t i = 0; i < shape.size(); ++i) want[i] = shape[i];
    bool same = true;
    for (int i = 0; i < GGML_MAX_DIMS; ++i) same = same && meta->ne[i] == want[i];
    if (!same) {
        const long long have[GGML_MAX_DIMS] = {meta->ne[0], meta->ne[1], meta->ne[2], meta->ne[3]};
        fail(MLLAMA_ERR_MODEL, "tensor '%s' has shape %s, expected %s (ggml order)", name.c_str(),
             shape_str(have, ggml_n_dims(meta)).c_str(), shape_str(want, static_cast<int>(shape.size())).c_str());
    }
    check_type(name, meta, kind);
    ggml_tensor * t = ggml_dup_tensor(ctx, meta);
    ggml_set_name(t, name.c_str());
    used_.emplace(src.file, src.name);
    sources_[t] = src;
    return t;
}

ggml_tensor * tensor_loader::load(ggml_context * ctx, tn id, int layer, std::vector<int64_t> shape, wkind kind) {
    ggml_tensor * t = load_optional(ctx, id, layer, std::move(shape), kind);
    if (!t) {
        const tensor_source src = find(tensor_name(id, layer));
        fail(MLLAMA_ERR_MODEL, "missing tensor '%s' in '%s'", src.name.c_str(), files_.back()->path().c_str());
    }
    return t;
}

std::vector<std::string> tensor_loader::unused() const {
    std::vector<std::string> out;
    for (const gguf_file * f : files_) {
        for (int64_t i = 0; i < f->n_tensors(); ++i) {
            if (!used_.count({f, f->tensor_name(i)})) out.emplace_back(f->tensor_name(i));
        }
    }
    return out;
}

// ref: transformers MllamaSelfAttentionDecoderLayer / MllamaCrossAttentionDecoderLayer
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
    const bool all_on_device = where.first_device_layer == 0;
    ggml_context * out_ctx = all_on_device ? where.device : where.cpu;
    ggml_tensor * embd = L.descriptor(tn::TOKEN_EMBD);
    const int64_t n_vocab_embd = embd ? embd->ne[1] : hp.n_vocab;
    if (n_vocab_embd < hp.n_vocab) {
        fail(MLLAMA_ERR_MODEL, "token_embd.weight has %lld rows, fewer than vocab_size %lld", (long long) n_vocab_embd, (long long) hp.n_vocab);
    }
    // The input embedding stays on the CPU (a row lookup), as llama.cpp does.
    w.token_embd = L.load(where.cpu, tn::TOKEN_EMBD, -1, {hp.n_embd, n_vocab_embd}, wkind::matrix);
    w.output_norm = L.load(out_ctx, tn::OUTPUT_NORM, -1, {hp.n_embd}, wkind::f32);
    w.output = L.load(out_ctx, tn::OUTPUT, -1, {hp.n_embd, hp.n_vocab}, wkind::matrix);
    w.rope_freqs = L.load_optional(out_ctx, tn::ROPE_FREQS, -1, {hp.n_embd_head / 2}, wkind::f32);
    for (int il = 0; il < hp.n_layer; ++il) {
        ggml_context * ctx = il >= where.first_device_layer ? where.device : where.cpu;
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

// ref: transformers MllamaVisionModel.__init__ and MllamaForConditionalGeneration.multi_modal_projector
vision_w load_vision_weights(const vision_hparams & hp, tensor_loader & L, ggml_context * ctx) {
    const int64_t d = hp.n_embd, n_ar = static_cast<int64_t>(hp.aspect_ratios.size()) + 1;  // row 0: no image
    vision_w w;
    w.patch_embd = L.load(ctx, tn::V_PATCH_EMBD, -1, {hp.patch_size, hp.patch_size, hp.n_channels, d}, wkind::floats);
    w.class_embd = L.load(ctx, tn::V_CLASS_EMBD, -1, {d}, wkind::f32);
    w.pos_embd = L.load(ctx, tn::V_POS_EMBD, -1, {d, hp.n_positions()}, wkind::floats);
    w.pos_gate = L.load(ctx, tn::V_POS_GATE, -1, {1}, wkind::f32);
    w.tile_pos_embd = L.load(ctx, tn::V_TILE_POS_EMBD, -1, {hp.max_tiles * hp.n_positions() * d, n_ar}, wkind::floats);
    w.tile_pos_gate = L.load_optional(ctx, tn::V_TILE_POS_GATE, -1, {1}, wkind::f32);  // Ollama: tanh(g) of the position gate
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

}  // namespace mllama

namespace mllama {

static float gate_tanh(const ggml_tensor * gate) {
    float value = 0.0f;
    ggml_backend_tensor_get(gate, &value, 0, sizeof(value));
    if (!std::isfinite(value)) fail(MLLAMA_ERR_MODEL, "gate '%s' is not finite", ggml_get_name(gate));
    return std::tanh(value);
}

static float gate_value(const ggml_tensor * gate) {
    float value = 0.0f;
    ggml_backend_tensor_get(gate, &value, 0, sizeof(value));
    if (!std::isfinite(value) || value < -1.0f || value > 2.0f) fail(MLLAMA_ERR_MODEL, "gate '%s' = %g is not a stored tanh", ggml_get_name(gate), value);
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
