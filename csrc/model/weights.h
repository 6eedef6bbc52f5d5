// Weight tensors of each component, loaded strictly: every required tensor is checked for presence,
// shape and type against the hparams. ggml order: ne[0] is the fastest dimension, and
// ggml_mul_mat(w, x) computes x @ w.T, so a HF Linear(in, out) weight has ne = [in, out].
#pragma once

#include "model/hparams.h"
#include "model/tensor_loader.h"

#include <vector>

struct ggml_context;
struct ggml_tensor;

namespace mllama {

struct placement;

struct norm_w {
    ggml_tensor * w = nullptr;
    ggml_tensor * b = nullptr;  // LayerNorm only
};

struct linear_w {
    ggml_tensor * w = nullptr;
    ggml_tensor * b = nullptr;  // nullptr: no bias
};

struct vision_layer_w {
    norm_w attn_norm, ffn_norm;
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    linear_w ffn_up, ffn_down;  // HF fc1, fc2
    ggml_tensor * attn_gate = nullptr, * ffn_gate = nullptr;  // global layers only (raw, tanh at runtime)
    float attn_gate_tanh = 1.0f, ffn_gate_tanh = 1.0f;        // tanh of the gates, read once after loading
};

struct vision_w {
    ggml_tensor * patch_embd = nullptr;      // [patch, patch, channels, v_n_embd]
    ggml_tensor * class_embd = nullptr;      // [v_n_embd]
    ggml_tensor * pos_embd = nullptr;        // [v_n_embd, n_positions]
    ggml_tensor * pos_gate = nullptr;        // [1] raw gate g: (1 - tanh g) * pos + tanh g * tile_pos
    ggml_tensor * tile_pos_embd = nullptr;   // [max_tiles * n_positions * v_n_embd, n_aspect_ratios + 1]
    ggml_tensor * pre_tile_embd = nullptr;   // [max_tiles * v_n_embd, n_aspect_ratios + 1]
    ggml_tensor * pre_tile_gate = nullptr;
    ggml_tensor * post_tile_embd = nullptr;
    ggml_tensor * post_tile_gate = nullptr;
    norm_w pre_ln, post_ln;
    std::vector<vision_layer_w> layers, global_layers;
    linear_w projector;                      // [v_output_dim, projection_dim]
    float pos_gate_tanh = 0.0f, pre_tile_gate_tanh = 0.0f, post_tile_gate_tanh = 0.0f;
};

// Matrices that take the same input, multiplied as one (placement.h's fuse_projections): a [K, M_0 + M_1 + ...]
// tensor over the data of the first n_parts of them, which lie one after the other in ggml's repacked CPU buffer;
// w is nullptr where fewer than two do.
struct fused_w {
    ggml_tensor * w = nullptr;
    int n_parts = 0;
};

struct self_attn_w {
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    fused_w qkv;  // q, k (and v)
};

struct cross_attn_w {
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    ggml_tensor * q_norm = nullptr, * k_norm = nullptr;      // RMSNorm over the head dim
    ggml_tensor * attn_gate = nullptr, * mlp_gate = nullptr;  // raw, tanh at runtime
    float attn_gate_tanh = 0.0f, mlp_gate_tanh = 0.0f;
};

struct ffn_w {
    ggml_tensor * gate = nullptr, * up = nullptr, * down = nullptr;
    fused_w gate_up;  // gate and up
};

struct text_layer_w {
    bool is_cross = false;
    ggml_tensor * attn_norm = nullptr, * ffn_norm = nullptr;
    self_attn_w self;    // self-attention layers
    cross_attn_w cross;  // cross-attention layers
    ffn_w ffn;
};

struct text_w {
    ggml_tensor * token_embd = nullptr;  // [n_embd, n_vocab_embd]
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;      // [n_embd, n_vocab]
    ggml_tensor * rope_freqs = nullptr;  // optional [n_embd_head / 2]; else computed from hparams
    std::vector<text_layer_w> layers;
};

// Read the scalar gates (after the weights are in their buffers) and store tanh(gate) on the host.
// pretanh: the vision gates were stored as tanh(g), the position gate as 1 - tanh(g) (Ollama).
void read_gates(text_w & text, vision_w & vision, bool pretanh);

text_w load_text_weights(const text_hparams & hp, tensor_loader & loader, const placement & where);
vision_w load_vision_weights(const vision_hparams & hp, tensor_loader & loader, ggml_context * ctx);

}  // namespace mllama
