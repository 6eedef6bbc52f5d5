// C ABI shims of the context: init/free, effective parameters, image encoding, decoding, memory, slot states.
#include "mllama.h"

#include "api/guard.h"
#include "runtime/context.h"
#include "runtime/encode_steps.h"
#include "runtime/op_paths.h"
#include "runtime/slot_state.h"

#include <algorithm>
#include <string>
#include <vector>

using mllama::guarded;
using mllama::require;

extern "C" {

mllama_context_params mllama_context_default_params(void) { return mllama::default_context_params(); }

mllama_status mllama_context_init(const mllama_model * model, const mllama_context_params * params,
                                  mllama_context ** out_context) {
    return guarded([&] {
        require(model && out_context, "context_init needs a model and an output pointer");
        *out_context = nullptr;
        const mllama_context_params p = params ? *params : mllama::default_context_params();
        *out_context = mllama::new_context(*model, p).release();
    });
}

void mllama_context_free(mllama_context * context) {
    const std::unique_lock<std::recursive_mutex> exclusive = mllama::rpc_exclusive();  // (frees on workers)
    delete context;
}

mllama_status mllama_context_get_params(const mllama_context * context, mllama_context_params * out) {
    return guarded([&] {
        require(context && out, "context_get_params needs a context and an output struct");
        *out = context->params;  // the context keeps no caller strings: they are NULL there
    });
}

mllama_status mllama_context_encode_image(mllama_context * context, int32_t slot, const float * pixels,
                                          int64_t n_pixels, int32_t aspect_ratio_id, int32_t n_tiles,
                                          float * features, int64_t n_features) {
    return guarded([&] {
        require(context, "context_encode_image needs a context");
        mllama::encode_image(*context, slot, pixels, n_pixels, aspect_ratio_id, n_tiles, features, n_features);
    });
}

mllama_status mllama_context_encode_begin(mllama_context * context, int32_t slot, const float * pixels,
                                          int64_t n_pixels, int32_t aspect_ratio_id, int32_t n_tiles,
                                          int32_t * n_stages) {
    return guarded([&] {
        require(context && n_stages, "context_encode_begin needs a context and an output");
        *n_stages = mllama::encode_begin(*context, slot, pixels, n_pixels, aspect_ratio_id, n_tiles);
    });
}

mllama_status mllama_context_encode_step(mllama_context * context, int32_t n_stages, int32_t * stages_left) {
    return guarded([&] {
        require(context && stages_left, "context_encode_step needs a context and an output");
        *stages_left = mllama::encode_step(*context, n_stages);
    });
}

mllama_status mllama_context_encode_cancel(mllama_context * context) {
    return guarded([&] {
        require(context, "context_encode_cancel needs a context");
        mllama::drop_encode_job(*context);
    });
}

mllama_status mllama_context_read_cross_kv(const mllama_context * context, int32_t slot, int32_t cross_index,
                                           float * k, float * v, int64_t n) {
    return guarded([&] {
        require(context, "context_read_cross_kv needs a context");
        mllama::read_cross_kv(*context, slot, cross_index, k, v, n);
    });
}

mllama_status mllama_context_decode(mllama_context * context, const int32_t * tokens, int32_t n_tokens,
                                    int32_t n_past, int32_t n_images, const uint8_t * row_images,
                                    const int32_t * out_rows, int32_t n_out, float * logits) {
    return guarded([&] {
        require(context, "context_decode needs a context");
        std::vector<int32_t> slots(static_cast<size_t>(std::max(n_images, 0)));
        for (int32_t i = 0; i < n_images; ++i) slots[i] = i;
        const mllama_batch_seq part{0, n_past, n_tokens, n_images, slots.data(), row_images};
        mllama::decode(*context, tokens, mllama::batch_parts(*context, &part, 1), out_rows, n_out, logits);
    });
}

mllama_status mllama_context_decode_batch(mllama_context * context, const int32_t * tokens,
                                          const mllama_batch_seq * seqs, int32_t n_seqs, const int32_t * out_rows,
                                          int32_t n_out, float * logits) {
    return guarded([&] {
        require(context, "context_decode_batch needs a context");
        mllama::decode(*context, tokens, mllama::batch_parts(*context, seqs, n_seqs), out_rows, n_out, logits);
    });
}

mllama_status mllama_context_seq_length(const mllama_context * context, int32_t seq_id, int32_t * out) {
    return guarded([&] {
        require(context && out, "context_seq_length needs a context and an output pointer");
        *out = mllama::seq_length(*context, seq_id);
    });
}

mllama_status mllama_context_seq_trim(mllama_context * context, int32_t seq_id, int32_t n_keep) {
    return guarded([&] {
        require(context, "context_seq_trim needs a context");
        mllama::seq_trim(*context, seq_id, n_keep);
    });
}

mllama_status mllama_context_seq_copy(mllama_context * context, int32_t src, int32_t dst, int32_t n_tokens) {
    return guarded([&] {
        require(context, "context_seq_copy needs a context");
        mllama::seq_copy(*context, src, dst, n_tokens);
    });
}

mllama_status mllama_context_op_paths(const mllama_context * context, char * buf, uint64_t cap, uint64_t * len) {
    return guarded([&] {
        require(context, "context_op_paths needs a context");
        const std::string text = mllama::op_paths(*context);
        mllama::copy_string(text.c_str(), text.size(), buf, cap, len);
    });
}

int64_t mllama_context_n_decoded(const mllama_context * context) {
    return context ? context->n_decoded : mllama::count_error("null context");
}

mllama_status mllama_context_get_memory(const mllama_context * context, mllama_context_memory * out) {
    return guarded([&] {
        require(context && out, "context and out must not be NULL");
        *out = mllama::context_memory(*context);
    });
}

mllama_status mllama_context_slot_state_info(const mllama_context * context, mllama_slot_state_info * out) {
    return guarded([&] {
        require(context && out, "context_slot_state_info needs a context and an output struct");
        *out = mllama::slot_state_info(*context);
    });
}

mllama_status mllama_context_get_slot_state(const mllama_context * context, int32_t slot, void * dst, uint64_t cap,
                                            uint64_t * len) {
    return guarded([&] {
        require(context && len, "context_get_slot_state needs a context and a length pointer");
        *len = 0;
        *len = mllama::get_slot_state(*context, slot, dst, cap);
    });
}

mllama_status mllama_context_set_slot_state(mllama_context * context, int32_t slot, const void * src, uint64_t size) {
    return guarded([&] {
        require(context && src, "context_set_slot_state needs a context and the slot state");
        mllama::set_slot_state(*context, slot, src, size);
    });
}

}  // extern "C"
