// Decoding: argument checks, the host-side inputs, and the decoder graph run.
#include "common/error.h"
#include "graph/decoder.h"
#include "graph/inputs.h"
#include "model/model.h"
#include "runtime/compute.h"
#include "runtime/context.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <vector>

namespace mllama {

static void check_decode_args(const mllama_context & c, const int32_t * tokens, int32_t n_tokens, int32_t n_past,
                              int32_t n_images, const uint8_t * row_images, const int32_t * out_rows, int32_t n_out,
                              const float * logits) {
    const text_hparams & hp = c.model->hp.text;
    const mllama_context_params & p = c.params;
    if (!tokens || n_tokens <= 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "decode needs at least one token");
    if (n_tokens > p.n_batch) fail(MLLAMA_ERR_INVALID_ARGUMENT, "%d tokens exceed n_batch %d", n_tokens, p.n_batch);
    if (n_past < 0 || static_cast<int64_t>(n_past) + n_tokens > p.n_ctx) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "context overflow: %d cached + %d new tokens exceed n_ctx %d", n_past,
             n_tokens, p.n_ctx);
    }
    if (n_images < 0 || n_images > static_cast<int32_t>(c.slots.size())) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "%d images exceed the %zu image slots", n_images, c.slots.size());
    }
    if (n_images > 0 && !row_images) fail(MLLAMA_ERR_INVALID_ARGUMENT, "decode with images needs the row/image table");
    for (int32_t img = 0; img < n_images; ++img) {
        if (!c.slots[img].used) fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d holds no image", img);
    }
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (tokens[i] < 0 || tokens[i] >= hp.n_vocab_embd) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "token id %d out of range [0, %lld)", tokens[i],
                 (long long) hp.n_vocab_embd);
        }
    }
    if (n_out < 0 || (n_out > 0 && (!out_rows || !logits))) fail(MLLAMA_ERR_INVALID_ARGUMENT, "invalid output rows");
    for (int32_t i = 0; i < n_out; ++i) {
        if (out_rows[i] < 0 || out_rows[i] >= n_tokens) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "output row %d out of range", out_rows[i]);
        }
    }
}

void decode(mllama_context & c, const int32_t * tokens, int32_t n_tokens, int32_t n_past, int32_t n_images,
            const uint8_t * row_images, const int32_t * out_rows, int32_t n_out, float * logits) {
    check_decode_args(c, tokens, n_tokens, n_past, n_images, row_images, out_rows, n_out, logits);
    const std::vector<ggml_fp16_t> kq_mask = causal_mask(n_past, n_tokens);
    const std::vector<int32_t> pos = positions(n_past, n_tokens);
    cross_mask x;
    if (n_images > 0) {
        std::vector<int32_t> image_tiles;
        for (int32_t img = 0; img < n_images; ++img) image_tiles.push_back(c.slots[img].n_tiles);
        x = cross_masks(row_images, n_tokens, image_tiles, c.state.n_vis, c.model->hp.vision.n_positions());
    }
    std::vector<int32_t> rows(out_rows, out_rows + n_out);
    if (rows.empty()) rows.push_back(n_tokens - 1);  // the graph needs an output; nothing is copied back

    text_inputs in;
    ggml_tensor * out = nullptr;
    const text_shape shape{n_tokens, n_past, n_images, static_cast<int64_t>(rows.size())};
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, k_max_nodes, /*grads=*/false);
        out = build_text(ctx, c, shape, in, gf);
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        return gf;
    };
    auto feed = [&] {
        ggml_backend_tensor_set(in.tokens, tokens, 0, ggml_nbytes(in.tokens));
        ggml_backend_tensor_set(in.pos, pos.data(), 0, ggml_nbytes(in.pos));
        ggml_backend_tensor_set(in.kq_mask, kq_mask.data(), 0, ggml_nbytes(in.kq_mask));
        ggml_backend_tensor_set(in.out_rows, rows.data(), 0, ggml_nbytes(in.out_rows));
        if (in.x_mask) {
            ggml_backend_tensor_set(in.x_mask, x.mask.data(), 0, ggml_nbytes(in.x_mask));
            ggml_backend_tensor_set(in.x_rows, x.rows.data(), 0, ggml_nbytes(in.x_rows));
        }
    };
    auto fetch = [&] {
        if (n_out > 0) ggml_backend_tensor_get(out, logits, 0, ggml_nbytes(out));
    };
    compute(c, build, feed, fetch);
    c.n_decoded += n_tokens;
}

}  // namespace mllama
