// C ABI shims of the metadata and the vocabulary (the tokenizer and chat template live in Python).
#include "mllama.h"

#include "api/guard.h"
#include "gguf/gguf_file.h"
#include "gguf/gguf_meta.h"
#include "gguf/names.h"
#include "model/model.h"

#include <cstring>
#include <vector>

using mllama::guarded;
using mllama::require;

extern "C" {

mllama_status mllama_model_meta_string(const mllama_model * model, const char * key, char * buf, uint64_t cap,
                                       uint64_t * len) {
    return guarded([&] {
        require(model && key, "metadata access needs a model and a key");
        const char * value = mllama::metadata(*model).str_by_name(key);
        mllama::copy_string(value, std::strlen(value), buf, cap, len);
    });
}

mllama_status mllama_model_meta_number(const mllama_model * model, const char * key, double * value) {
    return guarded([&] {
        require(model && key, "metadata access needs a model and a key");
        const double v = mllama::metadata(*model).number_by_name(key);
        require(value, "meta_number needs an output");
        *value = v;
    });
}

int64_t mllama_model_meta_ints(const mllama_model * model, const char * key, int64_t * buf, int64_t cap) {
    std::vector<int64_t> values;
    if (!model || !key) return mllama::count_error("meta_ints needs a model and a key");
    if (!mllama::metadata(*model).ints_by_name(key, values)) {
        return mllama::count_error("no integer array under that key");
    }
    mllama::set_last_error("");
    for (int64_t i = 0; buf && i < cap && i < static_cast<int64_t>(values.size()); ++i) buf[i] = values[i];
    return static_cast<int64_t>(values.size());
}

mllama_status mllama_model_vocab(const mllama_model * model, char * text, uint64_t cap, uint64_t * len,
                                 int32_t * types, int64_t n_types) {
    return guarded([&] {
        require(model, "model_vocab needs a model");
        const mllama::gguf_meta meta(model->files[0]->gguf());  // the tokenizer is in the text model's file
        if (!meta.has(mllama::kv::TOK_TOKENS)) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no tokenizer");
        uint64_t need = 0;
        for (const char * tok : meta.str_array(mllama::kv::TOK_TOKENS)) {
            const uint64_t l = std::strlen(tok) + 1;
            if (text && need + l <= cap) std::memcpy(text + need, tok, l);
            need += l;
        }
        if (len) *len = need;
        std::vector<int64_t> file_types;  // absent: every token is normal (1)
        meta.ints_by_name(mllama::key_name(mllama::kv::TOK_TOKEN_TYPE), file_types);
        for (int64_t i = 0; types && i < n_types; ++i) {
            types[i] = i < static_cast<int64_t>(file_types.size()) ? static_cast<int32_t>(file_types[i]) : 1;
        }
    });
}

}  // extern "C"
