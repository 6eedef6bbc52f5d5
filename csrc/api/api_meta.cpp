// C ABI: metadata and vocabulary access (the tokenizer and chat template live in Python).
#include "mllama.h"

#include "common/error.h"
#include "gguf/gguf_meta.h"
#include "api/guard.h"
#include "gguf.h"
#include "model/model.h"

#include <cstring>
#include <utility>
#include <string>

namespace {

// The key's id and the metadata of the file holding it (the text file first, then the projector).
std::pair<const gguf_context *, int64_t> find_key(const mllama_model * model, const char * key, bool required = true) {
    if (!model || !key) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "metadata access needs a model and a key");
    for (const auto & file : model->files) {
        const int64_t id = gguf_find_key(file->gguf(), key);
        if (id >= 0) return {file->gguf(), id};
    }
    if (required) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no metadata key '%s'", key);
    return {nullptr, -1};
}

bool number_of(const gguf_context * g, int64_t id, gguf_type type, double & out) {
    int64_t i = 0;
    if (mllama::scalar_int(g, id, type, i)) out = static_cast<double>(i);
    else if (type == GGUF_TYPE_FLOAT32) out = gguf_get_val_f32(g, id);
    else if (type == GGUF_TYPE_FLOAT64) out = gguf_get_val_f64(g, id);
    else if (type == GGUF_TYPE_BOOL) out = gguf_get_val_bool(g, id) ? 1.0 : 0.0;
    else return false;
    return true;
}

}  // namespace

extern "C" {

mllama_status mllama_model_meta_string(const mllama_model * model, const char * key, char * buf, uint64_t cap, uint64_t * len) {
    return mllama::guarded([&] {
        const auto [g, id] = find_key(model, key);
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "metadata key '%s' is not a string", key);
        const char * value = gguf_get_val_str(g, id);
        const uint64_t n = std::strlen(value);
        if (len) *len = n;
        if (buf && cap > 0) {
            const uint64_t copy = n < cap - 1 ? n : cap - 1;
            std::memcpy(buf, value, copy);
            buf[copy] = '\0';
        }
    });
}

mllama_status mllama_model_meta_number(const mllama_model * model, const char * key, double * value) {
    return mllama::guarded([&] {
        const auto [g, id] = find_key(model, key);
        if (!value) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "meta_number needs an output");
        if (!number_of(g, id, gguf_get_kv_type(g, id), *value)) {
            mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "metadata key '%s' is not a number", key);
        }
    });
}

int64_t mllama_model_meta_ints(const mllama_model * model, const char * key, int64_t * buf, int64_t cap) {
    if (!model || !key) return -1;
    const auto [g, id] = find_key(model, key, false);
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) return -1;
    const gguf_type type = gguf_get_arr_type(g, id);
    const int64_t n = static_cast<int64_t>(gguf_get_arr_n(g, id));
    const void * data = gguf_get_arr_data(g, id);
    for (int64_t i = 0; buf && i < cap && i < n; ++i) {
        switch (type) {
            case GGUF_TYPE_INT32: buf[i] = static_cast<const int32_t *>(data)[i]; break;
            case GGUF_TYPE_UINT32: buf[i] = static_cast<const uint32_t *>(data)[i]; break;
            case GGUF_TYPE_INT64: buf[i] = static_cast<const int64_t *>(data)[i]; break;
            case GGUF_TYPE_UINT64: buf[i] = static_cast<int64_t>(static_cast<const uint64_t *>(data)[i]); break;
            default: return -1;
        }
    }
    return n;
}

mllama_status mllama_model_vocab(const mllama_model * model, char * text, uint64_t cap, uint64_t * len, int32_t * types, int64_t n_types) {
    return mllama::guarded([&] {
        if (!model) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "model_vocab needs a model");
        const gguf_context * g = model->files[0]->gguf();
        const int64_t id = gguf_find_key(g, "tokenizer.ggml.tokens");
        if (id < 0) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no tokenizer");
        const int64_t n = static_cast<int64_t>(gguf_get_arr_n(g, id));
        uint64_t need = 0;
        for (int64_t i = 0; i < n; ++i) {
            const char * tok = gguf_get_arr_str(g, id, static_cast<size_t>(i));
            const uint64_t l = std::strlen(tok) + 1;
            if (text && need + l <= cap) std::memcpy(text + need, tok, l);
            need += l;
        }
        if (len) *len = need;
        const int64_t tid = gguf_find_key(g, "tokenizer.ggml.token_type");
        for (int64_t i = 0; types && i < n_types; ++i) {
            types[i] = 1;
            if (tid >= 0 && gguf_get_arr_type(g, tid) == GGUF_TYPE_INT32 && i < static_cast<int64_t>(gguf_get_arr_n(g, tid))) {
                types[i] = static_cast<const int32_t *>(gguf_get_arr_data(g, tid))[i];
            }
        }
    });
}

}  // extern "C"
