// ref: transformers 5.23.0 models/mllama/modeling_mllama.py MllamaVisionModel.forward and llama-models
// 0.3.0 llama_models/llama3/multimodal/model.py VisionEncoder / ImageTransformer (Meta's convention
// for the intermediate layers: the INPUT of each listed layer).
#include "graph/vision.h"

#include "graph/ops.h"
#include "kernels/dispatch.h"
#include "runtime/backend.h"
#include "model/model.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace mllama {

int64_t padded_positions(int64_t n_positions) { return n_positions + (8 - n_positions % 8) % 8; }

static bool half_weight(const ggml_tensor * w) { return w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_BF16; }

// The attention mask of every layer, and which of its rows are all zeros (for our attention kernel).
struct layer_mask {
    ggml_tensor * mask = nullptr;       // [N, N] F16
    ggml_tensor * zero_rows = nullptr;  // [N] I32, or null
};

bool gemm_kernel_for(const linear_w & l, const vision_options & opt) {
    return opt.bf16_gemm && bf16_linear_supported(l.w) && (!l.b || l.b->type == GGML_TYPE_F32);
}

// w x^T: our BF16 GEMM where it applies, ggml's mul_mat otherwise. [M, N] F32.
static ggml_tensor * product(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, const vision_options & opt) {
    if (!gemm_kernel_for({w, nullptr}, opt)) return ggml_mul_mat(ctx, w, x);
    return bf16_linear(ctx, w, x, /*bias=*/nullptr, /*gelu=*/false, /*bf16_out=*/false, opt.amx_gemm);
}

// The layer norm of h for products that all take our GEMM (fused: one pass, the GEMM's input type out), else
// ggml's norm, mul and add in F32. [D, N]
static ggml_tensor * norm_for_products(ggml_context * ctx, ggml_tensor * h, const norm_w & n, float eps, bool our_gemm) {
    const bool f32 = h->type == GGML_TYPE_F32 && h->nb[0] == sizeof(float) && n.w->type == GGML_TYPE_F32 &&
                     (!n.b || n.b->type == GGML_TYPE_F32);
    return our_gemm && f32 ? layer_norm_for_linear(ctx, h, n.w, n.b, eps) : layer_norm(ctx, h, n, eps);
}

// fc2(gelu(fc1(x))), exact GELU. With our GEMM, bias and GELU run in fc1's epilogue, which hands
// fc2 its input in BF16 (the rounding ggml's product would apply to it anyway).
static ggml_tensor * mlp(ggml_context * ctx, const vision_layer_w & l, ggml_tensor * x, const vision_options & opt) {
    if (gemm_kernel_for(l.ffn_up, opt) && gemm_kernel_for(l.ffn_down, opt)) {
        x = bf16_linear(ctx, l.ffn_up.w, x, l.ffn_up.b, /*gelu=*/opt.fast_gelu,
                        /*bf16_out=*/opt.fast_gelu, opt.amx_gemm);  // [n_ff, N] BF16 (F32 unfused)
        if (!opt.fast_gelu) x = ggml_gelu_erf(ctx, x);
        return bf16_linear(ctx, l.ffn_down.w, x, l.ffn_down.b, /*gelu=*/false, /*bf16_out=*/false,
                           opt.amx_gemm);  // [D, N]
    }
    x = linear(ctx, x, l.ffn_up);                                                              // [n_ff, N]
    x = opt.fast_gelu ? gelu_erf_fast(ctx, x) : ggml_gelu_erf(ctx, x);
    return linear(ctx, x, l.ffn_down);                                                         // [D, N]
}

// ref: MllamaVisionEncoderLayer.forward, in two halves (two stages of an encode in steps); gated for the
// global layers. The first half: self-attention over all tiles of the image, added to h. [D, N]
static ggml_tensor * attention_half(ggml_context * ctx, const vision_hparams & hp, const vision_layer_w & l,
                                    ggml_tensor * h, const layer_mask & mask, bool gated, const char * prefix,
                                    const vision_options & opt) {
    const int64_t n_tok = h->ne[1], head_dim = hp.n_embd / hp.n_head;
    const bool our_gemm = gemm_kernel_for({l.wq, nullptr}, opt) && gemm_kernel_for({l.wk, nullptr}, opt) &&
                          gemm_kernel_for({l.wv, nullptr}, opt);
    ggml_tensor * x = norm_for_products(ctx, h, l.attn_norm, hp.norm_eps, our_gemm);
    // half-precision weights: convert the input once for q, k and v, to the type the products
    // multiply in (ggml's would convert it inside each product, with the same rounding; the fused norm
    // already did)
    const ggml_type x_type = !gemm_kernel_for({l.wq, nullptr}, opt) ? l.wq->type
                             : bf16_linear_takes_f32()              ? GGML_TYPE_F32
                                                                    : GGML_TYPE_BF16;
    if (half_weight(l.wq) && x_type != x->type) x = ggml_cast(ctx, x, x_type);  // [D, N] F16/BF16 (or F32)
    ggml_tensor * q = ggml_reshape_3d(ctx, product(ctx, l.wq, x, opt), head_dim, hp.n_head, n_tok);  // [hd, H, N]
    ggml_tensor * k = ggml_reshape_3d(ctx, product(ctx, l.wk, x, opt), head_dim, hp.n_head, n_tok);
    ggml_tensor * v = ggml_reshape_3d(ctx, product(ctx, l.wv, x, opt), head_dim, hp.n_head, n_tok);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    ggml_tensor * a = opt.bf16_attention
                          ? bf16_attention(ctx, q, k, v, mask.mask, mask.zero_rows, opt.amx_attention)  // [D, N]
                          : attention(ctx, {q, k, v, mask.mask, scale});                             // [D, N]
    a = named(product(ctx, l.wo, a, opt), prefix, "attn_out");
    if (gated) a = ggml_scale(ctx, a, l.attn_gate_tanh);
    return ggml_add(ctx, h, a);
}

// The second half: the MLP with exact (erf) GELU, added to h. [D, N]
static ggml_tensor * mlp_half(ggml_context * ctx, const vision_hparams & hp, const vision_layer_w & l,
                              ggml_tensor * h, bool gated, const char * prefix, const vision_options & opt) {
    const bool our_gemm = gemm_kernel_for(l.ffn_up, opt) && gemm_kernel_for(l.ffn_down, opt);  // mlp's test
    ggml_tensor * x = norm_for_products(ctx, h, l.ffn_norm, hp.norm_eps, our_gemm);
    x = mlp(ctx, l, x, opt);
    x = named(x, prefix, "ffn_out");  // [D, N]
    if (gated) x = ggml_scale(ctx, x, l.ffn_gate_tanh);
    return named(ggml_add(ctx, h, x), prefix, "out");
}

// One row of a per-aspect-ratio table as [n_embd, rows, max_tiles] (F32).
static ggml_tensor * tile_table_row(ggml_context * ctx, ggml_tensor * table, ggml_tensor * ar_id, int64_t n_embd,
                                    int64_t rows, int64_t n_tiles) {
    ggml_tensor * row = ggml_get_rows(ctx, table, ar_id);  // [n_tiles * rows * n_embd, 1]
    return ggml_reshape_3d(ctx, row, n_embd, rows, n_tiles);
}

static ggml_tensor * as_f32(ggml_context * ctx, ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 ? t : ggml_cast(ctx, t, GGML_TYPE_F32);
}

// Patch, tile and position embeddings, layernorm_pre and the pad rows: [D, L, NT].
static ggml_tensor * embed(ggml_context * ctx, const vision_hparams & hp, const vision_w & w, vision_inputs & in,
                           const vision_options & opt) {
    const int64_t D = hp.n_embd, NT = hp.max_tiles, P = hp.n_positions(), ps = hp.patch_size;
    const int64_t kernel = ps * ps * hp.n_channels;
    ggml_tensor * h;
    {  // ref: patch_embedding (Conv2d, stride = kernel): im2col + matmul, patches row-major
        ggml_tensor * cols = ggml_im2col(ctx, w.patch_embd, in.pixels, /*s0=*/ps, /*s1=*/ps, /*p0=*/0, /*p1=*/0,
                                         /*d0=*/1, /*d1=*/1, /*is_2D=*/true, GGML_TYPE_F32);  // [k, pw, ph, NT]
        cols = ggml_reshape_2d(ctx, cols, kernel, hp.n_patches() * NT);                    // [k, n_patches * NT]
        // our GEMM where it applies (BF16 weights: 0.14 s at 69 GFLOPS in ggml's product on the AMX Xeon)
        h = product(ctx, ggml_reshape_2d(ctx, w.patch_embd, kernel, D), cols, opt);       // [D, n_patches * NT]
        h = ggml_reshape_3d(ctx, h, D, hp.n_patches(), NT);                                 // [D, n_patches, NT]
        named(h, "v", "patch_embd");
    }
    {  // ref: MllamaPrecomputedAspectRatioEmbedding (pre_tile_positional_embedding), on patch tokens only
        ggml_tensor * e = tile_table_row(ctx, w.pre_tile_embd, in.ar_id, D, 1, NT);  // [D, 1, NT]
        h = named(ggml_add(ctx, h, ggml_scale(ctx, as_f32(ctx, e), w.pre_tile_gate_tanh)), "v", "pre_tile");
    }
    {  // ref: class_embedding prepended as token 0 of every tile
        ggml_tensor * cls = ggml_repeat(ctx, ggml_reshape_3d(ctx, w.class_embd, D, 1, 1),
                                        ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, 1, NT));  // [D, 1, NT]
        h = ggml_concat(ctx, cls, h, /*dim=*/1);  // [D, P, NT]
    }
    {  // ref: MllamaPrecomputedPositionEmbedding (gated_positional_embedding)
        const float g = w.pos_gate_tanh;
        h = ggml_add(ctx, h, ggml_scale(ctx, as_f32(ctx, w.pos_embd), 1.0f - g));  // [D, P] broadcast over tiles
        ggml_tensor * tile = tile_table_row(ctx, w.tile_pos_embd, in.ar_id, D, P, NT);  // [D, P, NT]
        h = named(ggml_add(ctx, h, ggml_scale(ctx, as_f32(ctx, tile), g)), "v", "pos");
    }
    h = named(layer_norm(ctx, h, w.pre_ln, hp.norm_eps), "v", "pre_ln");
    return ggml_pad(ctx, h, /*p0=*/0, /*p1=*/padded_positions(P) - P, /*p2=*/0, /*p3=*/0);  // [D, L, NT]: zero pad rows
}

// Channels [final | interleaved intermediates] for the real (unpadded) positions: [OD, P, NT].
static ggml_tensor * assemble(ggml_context * ctx, const vision_hparams & hp, ggml_tensor * h,
                              const std::vector<ggml_tensor *> & inter) {
    const int64_t D = hp.n_embd, NT = hp.max_tiles, P = hp.n_positions(), L = padded_positions(P);
    const int64_t K = static_cast<int64_t>(inter.size()), N = h->ne[1];
    ggml_tensor * stacked = nullptr;  // [K, D, N]: channel d * K + k once flattened
    for (ggml_tensor * t : inter) {
        ggml_tensor * col = ggml_reshape_3d(ctx, t, 1, D, N);
        stacked = stacked ? ggml_concat(ctx, stacked, col, /*dim=*/0) : col;
    }
    ggml_tensor * out = h;
    if (stacked) out = ggml_concat(ctx, h, ggml_reshape_2d(ctx, stacked, K * D, N), /*dim=*/0);  // [OD, N]
    out = ggml_reshape_3d(ctx, out, out->ne[0], L, NT);                                    // [OD, L, NT]
    out = ggml_view_3d(ctx, out, out->ne[0], P, NT, out->nb[1], out->nb[2], 0);          // drop pad rows
    return named(ggml_cont(ctx, out), "v", "output");                                      // [OD, P, NT]
}

vision_options vision_options_for(const mllama_model & model, const cpu_kernel_set & allowed) {
    vision_options opt;
    const cpu_kernel_set kernels = kernels_for_compute(allowed, cpu_kernels_allowed_on(model.plan, model.plan.vision));
    if (kernel_family() == cpu_family::none || model.vision.layers.empty()) return opt;
    const vision_hparams & hp = model.hp.vision;
    const ggml_type weight_type = model.vision.layers[0].wq->type;
    const bool half_weights = weight_type == GGML_TYPE_F16 || weight_type == GGML_TYPE_BF16;  // F32 weights: exact path
    const bool head_fits = hp.n_embd / hp.n_head <= k_bf16_attn_max_head_dim;
    opt.bf16_attention = kernels.may_run(cpu_kernel::attn) && half_weights && head_fits;
    // F16 weights keep their precision: no BF16 GEMM for them
    opt.bf16_gemm = kernels.may_run(cpu_kernel::gemm) && weight_type == GGML_TYPE_BF16;
    opt.amx_gemm = opt.bf16_gemm && kernels.may_run(cpu_kernel::amx);
    opt.amx_attention = opt.bf16_attention && kernels.may_run(cpu_kernel::amx);
    opt.fast_gelu = kernels.may_run(cpu_kernel::gelu);
    return opt;
}

int vision_n_stages(const vision_hparams & hp) { return 1 + 2 * (hp.n_layer + hp.n_global_layer); }

// Stage `stage` of the layers that start at stage `base`: layer (stage - base) / 2, its attention half when the
// difference is even, else its MLP half.
static ggml_tensor * layer_stage(ggml_context * ctx, const vision_hparams & hp,
                                 const std::vector<vision_layer_w> & layers, int stage, int base, ggml_tensor * h,
                                 const layer_mask & mask, bool gated, const char * kind, const vision_options & opt) {
    const int il = (stage - base) / 2;
    char prefix[64];
    std::snprintf(prefix, sizeof(prefix), "%s.%d", kind, il);
    if ((stage - base) % 2 == 0) return attention_half(ctx, hp, layers[il], h, mask, gated, prefix, opt);
    return mlp_half(ctx, hp, layers[il], h, gated, prefix, opt);
}

ggml_tensor * build_vision_stages(ggml_context * ctx, const mllama_model & model, vision_inputs & in,
                                  const vision_options & opt, int first, int last, ggml_tensor * h,
                                  const intermediate_sink & keep) {
    const vision_hparams & hp = model.hp.vision;
    const vision_w & w = model.vision;
    const int64_t D = hp.n_embd, NT = hp.max_tiles, L = padded_positions(hp.n_positions()), N = L * NT;
    const int first_global = 1 + 2 * hp.n_layer;
    const bool post_here = first < first_global && last >= first_global;  // post_ln and the post-tile embedding
    if (first == 0 || post_here) {
        in.ar_id = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
        ggml_set_input(in.ar_id);
    }
    if (last > 1 && !in.mask) {  // a layer among the stages
        in.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, N, N);
        ggml_set_input(in.mask);
    }
    if (first == 0) {
        in.pixels = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hp.image_size, hp.image_size, hp.n_channels, NT);
        ggml_set_input(in.pixels);
        named(in.pixels, "", "v.pixels");
        h = ggml_reshape_2d(ctx, embed(ctx, hp, w, in, opt), D, N);  // [D, N]: all tiles, one sequence
    }
    const layer_mask mask{in.mask, opt.bf16_attention && in.mask ? bf16_attention_mask_rows(ctx, in.mask) : nullptr};
    for (int stage = std::max(first, 1); stage < std::min(last, first_global); ++stage) {
        const auto & inter = hp.intermediate_layers;  // the inputs of these layers are kept
        const auto at = std::lower_bound(inter.begin(), inter.end(), (stage - 1) / 2);
        if ((stage - 1) % 2 == 0 && at != inter.end() && *at == (stage - 1) / 2) {
            keep(static_cast<size_t>(at - inter.begin()), h);
        }
        h = layer_stage(ctx, hp, w.layers, stage, 1, h, mask, false, "v.blk", opt);  // [D, N]
    }
    if (post_here) {
        h = named(layer_norm(ctx, h, w.post_ln, hp.norm_eps), "v", "post_ln");
        // ref: post_tile_positional_embedding, on all L tokens of each tile (CLS and pads too)
        ggml_tensor * e = tile_table_row(ctx, w.post_tile_embd, in.ar_id, D, 1, NT);  // [D, 1, NT]
        e = ggml_scale(ctx, as_f32(ctx, e), w.post_tile_gate_tanh);
        h = ggml_add(ctx, ggml_reshape_3d(ctx, h, D, L, NT), e);  // [D, L, NT]
        h = named(ggml_reshape_2d(ctx, h, D, N), "v", "post_tile");  // [D, N]
    }
    for (int stage = std::max(first, first_global); stage < last; ++stage) {
        h = layer_stage(ctx, hp, w.global_layers, stage, first_global, h, mask, true, "v.global.blk", opt);  // [D, N]
    }
    return h;
}

ggml_tensor * build_vision_output(ggml_context * ctx, const vision_hparams & hp, ggml_tensor * h,
                                  const std::vector<ggml_tensor *> & inter) {
    return assemble(ctx, hp, h, inter);
}

ggml_tensor * build_vision(ggml_context * ctx, const mllama_model & model, vision_inputs & in,
                           const vision_options & opt) {
    const vision_hparams & hp = model.hp.vision;
    std::vector<ggml_tensor *> inter(hp.intermediate_layers.size(), nullptr);
    ggml_tensor * h = build_vision_stages(ctx, model, in, opt, 0, vision_n_stages(hp), nullptr,
                                          [&](size_t k, ggml_tensor * t) { inter[k] = t; });
    return build_vision_output(ctx, hp, h, inter);
}

}  // namespace mllama
