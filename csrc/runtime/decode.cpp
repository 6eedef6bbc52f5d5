// Decoding: the checks of a batch, the host-side inputs, and the decoder graph run.
#include "common/error.h"
#include "graph/decoder.h"
#include "graph/inputs.h"
#include "model/model.h"
#include "runtime/compute.h"
#include "runtime/context.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <vector>

namespace mllama {

static void check_part(const mllama_context & c, const mllama_batch_seq & s, std::vector<bool> & seen) {
    const int32_t n_seq = static_cast<int32_t>(c.seq_length.size());
    if (s.seq_id < 0 || s.seq_id >= n_seq) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "sequence id %d out of range [0, %d) (n_seq_max)", s.seq_id, n_seq);
    }
    if (seen[s.seq_id]) fail(MLLAMA_ERR_INVALID_ARGUMENT, "sequence %d has two parts in one batch", s.seq_id);
    seen[s.seq_id] = true;
    if (s.n_tokens <= 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "sequence %d: a part needs at least one token", s.seq_id);
    if (s.n_images < 0 || s.n_images > static_cast<int32_t>(c.slots.size())) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "%d images exceed the %zu image slots", s.n_images, c.slots.size());
    }
    if (s.n_images > 0 && (!s.image_slots || !s.row_images)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "decode with images needs the image slots and the row/image table");
    }
    for (int32_t img = 0; img < s.n_images; ++img) {
        const int32_t slot = s.image_slots[img];
        if (slot < 0 || slot >= static_cast<int32_t>(c.slots.size()) || !c.slots[slot].used) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d holds no image", slot);
        }
    }
    const int64_t end = static_cast<int64_t>(s.n_past) + s.n_tokens;
    if (s.n_past < 0 || end > c.params.n_ctx) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "context overflow: %d cached + %d new tokens exceed n_ctx %d", s.n_past,
             s.n_tokens, c.params.n_ctx);
    }
    if (s.n_past > c.seq_length[s.seq_id]) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "sequence %d holds %d positions: cannot evaluate from position %d",
             s.seq_id, c.seq_length[s.seq_id], s.n_past);
    }
}

std::vector<batch_part> batch_parts(const mllama_context & c, const mllama_batch_seq * seqs, int32_t n_seqs) {
    if (!seqs || n_seqs <= 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "a batch needs at least one sequence part");
    std::vector<bool> seen(c.seq_length.size(), false);
    std::vector<batch_part> parts;
    int64_t row = 0;
    for (int32_t i = 0; i < n_seqs; ++i) {
        const mllama_batch_seq & s = seqs[i];
        check_part(c, s, seen);
        if (row + s.n_tokens > c.params.n_batch) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "%lld tokens exceed n_batch %d", (long long) (row + s.n_tokens),
                 c.params.n_batch);
        }
        batch_part p;
        p.seq = s.seq_id, p.n_past = s.n_past, p.n_tokens = s.n_tokens, p.first_row = static_cast<int32_t>(row);
        p.slots.assign(s.image_slots, s.image_slots + s.n_images);
        p.row_images = s.row_images;
        parts.push_back(std::move(p));
        row += s.n_tokens;
    }
    return parts;
}

static void check_tokens(const mllama_context & c, const int32_t * tokens, int32_t n_tokens, const int32_t * out_rows,
                         int32_t n_out, const float * logits) {
    const text_hparams & hp = c.model->hp.text;
    if (!tokens) fail(MLLAMA_ERR_INVALID_ARGUMENT, "decode needs at least one token");
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

// The host-side inputs of a batch: positions, causal masks per part, cross-attention masks.
struct text_feed {
    std::vector<int32_t> pos;
    std::vector<std::vector<ggml_fp16_t>> kq_masks;
    std::vector<int64_t> kv_cells;
    cross_mask x;
};

static text_feed feed_for(const mllama_context & c, const std::vector<batch_part> & parts,
                          const std::vector<attention_group> & groups, int32_t n_tokens, slot_span span) {
    text_feed f;
    for (const batch_part & p : parts) {
        const std::vector<int32_t> pos = positions(p.n_past, p.n_tokens);
        f.pos.insert(f.pos.end(), pos.begin(), pos.end());
    }
    for (const attention_group & g : groups) f.kq_masks.push_back(attention_mask(parts, g));
    f.kv_cells = cache_cells(parts, c.params.n_ctx);
    if (span.count > 0) {
        std::vector<int32_t> slot_tiles;
        for (const image_slot & s : c.slots) slot_tiles.push_back(s.n_tiles);
        f.x = cross_masks(parts, n_tokens, span, slot_tiles, c.state.n_vis, c.model->hp.vision.n_positions());
    }
    return f;
}

static void run_text(mllama_context & c, const int32_t * tokens, const std::vector<batch_part> & parts,
                     int32_t n_tokens, std::vector<int32_t> rows, float * logits, bool copy_logits) {
    const std::vector<attention_group> groups = attention_groups(parts);
    const text_shape shape{n_tokens, &parts, &groups, slots_read(parts), static_cast<int64_t>(rows.size())};
    const text_feed f = feed_for(c, parts, groups, n_tokens, shape.slots);
    text_inputs in;
    ggml_tensor * out = nullptr;
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, c.max_nodes, /*grads=*/false);
        out = build_text(ctx, c, shape, in, gf);
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        return gf;
    };
    auto feed = [&] {
        ggml_backend_tensor_set(in.tokens, tokens, 0, ggml_nbytes(in.tokens));
        ggml_backend_tensor_set(in.pos, f.pos.data(), 0, ggml_nbytes(in.pos));
        for (size_t i = 0; i < groups.size(); ++i) {
            ggml_backend_tensor_set(in.kq_masks[i], f.kq_masks[i].data(), 0, ggml_nbytes(in.kq_masks[i]));
        }
        ggml_backend_tensor_set(in.kv_cells, f.kv_cells.data(), 0, ggml_nbytes(in.kv_cells));
        ggml_backend_tensor_set(in.out_rows, rows.data(), 0, ggml_nbytes(in.out_rows));
        if (in.x_mask) {
            ggml_backend_tensor_set(in.x_mask, f.x.mask.data(), 0, ggml_nbytes(in.x_mask));
            ggml_backend_tensor_set(in.x_rows, f.x.rows.data(), 0, ggml_nbytes(in.x_rows));
        }
    };
    auto fetch = [&] {
        if (copy_logits) ggml_backend_tensor_get(out, logits, 0, ggml_nbytes(out));
    };
    compute(c, build, feed, fetch);
}

void decode(mllama_context & c, const int32_t * tokens, const std::vector<batch_part> & parts, const int32_t * out_rows,
            int32_t n_out, float * logits) {
    const int32_t n_tokens = parts.back().first_row + parts.back().n_tokens;
    check_tokens(c, tokens, n_tokens, out_rows, n_out, logits);
    std::vector<int32_t> rows(out_rows, out_rows + n_out);
    if (rows.empty()) rows.push_back(n_tokens - 1);  // the graph needs an output; nothing is copied back
    try {
        run_text(c, tokens, parts, n_tokens, std::move(rows), logits, n_out > 0);
    } catch (...) {
        for (const batch_part & p : parts) {  // cells from n_past on may be half written
            c.seq_length[p.seq] = std::min(c.seq_length[p.seq], p.n_past);
        }
        throw;
    }
    for (const batch_part & p : parts) c.seq_length[p.seq] = p.n_past + p.n_tokens;
    c.n_decoded += n_tokens;
}

}  // namespace mllama
