// ref: transformers 5.23.0 models/mllama/modeling_mllama.py MllamaForConditionalGeneration
// (multi_modal_projector) and MllamaTextCrossAttention.forward (k_proj, v_proj, k_norm).
#include "graph/cross_kv.h"

#include "graph/ops.h"
#include "graph/vision.h"
#include "kernels/dispatch.h"
#include "model/model.h"

#include "ggml.h"

#include <cstdio>

namespace mllama {

// Our BF16 GEMM takes the cross-attention K or V projection of the image tokens: it runs for the vision tower
// and w is quantized (decoded to BF16 once per image by dequantize_bf16: over an image's tokens twice the speed
// of ggml's quantized GEMM; bench/README.md).
static bool gemm_for_projection(const ggml_tensor * w, const vision_options & opt) {
    return opt.bf16_gemm && dequantize_bf16_supported(w);
}

int cross_kv_products_on_gemm(const mllama_model & model, const vision_options & opt) {
    int n = 0;
    for (const text_layer_w & l : model.text.layers) {
        if (!l.is_cross) continue;
        n += (gemm_for_projection(l.cross.wk, opt) ? 1 : 0) + (gemm_for_projection(l.cross.wv, opt) ? 1 : 0);
    }
    return n;
}

// w x^T: ggml's product, or our GEMM on w decoded to BF16 (x_gemm: x in the GEMM's input type). [M, n_vis]
static ggml_tensor * project(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * x_gemm,
                             const vision_options & opt) {
    if (!gemm_for_projection(w, opt)) return ggml_mul_mat(ctx, w, x);
    return bf16_linear(ctx, dequantize_bf16(ctx, w, x_gemm), x_gemm, /*bias=*/nullptr, /*gelu=*/false,
                       /*bf16_out=*/false, opt.amx_gemm);
}

ggml_tensor * project_vision(ggml_context * ctx, const mllama_model & model, ggml_tensor * vision_out,
                             const vision_options & opt) {
    const linear_w & proj = model.vision.projector;
    const int64_t n_vis = vision_out->ne[1] * vision_out->ne[2];
    ggml_tensor * x = ggml_reshape_2d(ctx, vision_out, vision_out->ne[0], n_vis);  // [OD, NT * P]
    x = gemm_kernel_for(proj, opt)
            ? bf16_linear(ctx, proj.w, x, proj.b, /*gelu=*/false, /*bf16_out=*/false, opt.amx_gemm)
            : linear(ctx, x, proj);  // [n_embd, NT * P]
    return named(x, "mm", "out");
}

cross_kv build_cross_kv_layers(ggml_context * ctx, const mllama_model & model, ggml_tensor * x,
                               const vision_options & opt, int first, int last) {
    const text_hparams & hp = model.hp.text;
    const int64_t n_vis = x->ne[1];
    ggml_tensor * x_gemm = nullptr;  // x converted once for every projection our GEMM takes
    if (cross_kv_products_on_gemm(model, opt) > 0) {
        x_gemm = bf16_linear_takes_f32() ? x : ggml_cast(ctx, x, GGML_TYPE_BF16);  // [n_embd, NT * P]
    }
    cross_kv out;
    char prefix[64];
    for (int il = 0, cross_index = -1; il < hp.n_layer; ++il) {
        const text_layer_w & l = model.text.layers[il];
        if (!l.is_cross) continue;
        ++cross_index;
        if (cross_index < first || cross_index >= last) continue;
        std::snprintf(prefix, sizeof(prefix), "blk.%d.cross", il);
        ggml_tensor * k = project(ctx, l.cross.wk, x, x_gemm, opt);                 // [hd * Hkv, NT * P]
        k = ggml_reshape_3d(ctx, k, hp.n_embd_head, hp.n_head_kv, n_vis);           // [hd, Hkv, NT * P]
        k = named(rms_norm(ctx, k, l.cross.k_norm, hp.rms_norm_eps), prefix, "k");  // [hd, Hkv, NT * P]
        ggml_tensor * v = project(ctx, l.cross.wv, x, x_gemm, opt);                 // [hd * Hkv, NT * P]
        v = ggml_reshape_3d(ctx, v, hp.n_embd_head, hp.n_head_kv, n_vis);           // [hd, Hkv, NT * P]
        out.k.push_back(k);
        out.v.push_back(named(v, prefix, "v"));
    }
    return out;
}

cross_kv build_cross_kv(ggml_context * ctx, const mllama_model & model, ggml_tensor * vision_out,
                        const vision_options & opt) {
    ggml_tensor * x = project_vision(ctx, model, vision_out, opt);  // [n_embd, NT * P]
    return build_cross_kv_layers(ctx, model, x, opt, 0, static_cast<int>(model.hp.text.cross_layers.size()));
}

ggml_tensor * image_tiles(ggml_context * ctx, ggml_tensor * vision_out, int64_t n_tiles) {
    if (n_tiles >= vision_out->ne[2]) return vision_out;
    return ggml_view_3d(ctx, vision_out, vision_out->ne[0], vision_out->ne[1], n_tiles, vision_out->nb[1],
                        vision_out->nb[2], 0);  // [OD, P, n_tiles]
}

ggml_tensor * slot_rows(ggml_context * ctx, ggml_tensor * t, bool head_major, int64_t n_vis, int64_t slot,
                        int64_t n_rows) {
    return cache_rows(ctx, t, head_major, slot * n_vis, n_rows);  // [hd, Hkv, n_rows]
}

ggml_tensor * slot_view(ggml_context * ctx, ggml_tensor * t, bool head_major, int64_t n_vis, int64_t first_slot,
                        int64_t n_slots) {
    return slot_rows(ctx, t, head_major, n_vis, first_slot, n_vis * n_slots);  // [hd, Hkv, n_slots * n_vis]
}

}  // namespace mllama
