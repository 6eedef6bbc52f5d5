// Typed, checked access to GGUF metadata. Every failure names the key; integer keys accept any
// integer GGUF type whose value fits (converters disagree on u32 vs i32).
#pragma once

#include "gguf/names.h"
#include "gguf.h"

#include <cstdint>
#include <string>
#include <vector>

struct gguf_context;

namespace mllama {

// Keys are looked up in each context in turn (a text file, then its projector file).
class gguf_meta {
  public:
    explicit gguf_meta(const gguf_context * ctx) : ctxs_{ctx} {}
    explicit gguf_meta(std::vector<const gguf_context *> ctxs) : ctxs_(std::move(ctxs)) {}

    bool has(kv key) const;
    int64_t get_int(kv key) const;
    int64_t get_int(kv key, int64_t fallback) const;
    float get_float(kv key) const;
    float get_float(kv key, float fallback) const;
    std::string get_str(kv key) const;
    std::string get_str(kv key, const std::string & fallback) const;
    std::vector<int64_t> get_int_array(kv key) const;
    std::vector<float> get_float_array(kv key) const;
    int64_t array_size(kv key) const;  // -1 when absent
    // The strings of a string array (pointers into the metadata; empty when absent or of another type).
    std::vector<const char *> str_array(kv key) const;

    // The id of a string in the tokenizer vocabulary, or -1.
    int64_t token_id(const std::string & text) const;

    // Lookups by a caller-given key (the C ABI's mllama_model_meta_*); failures are
    // MLLAMA_ERR_INVALID_ARGUMENT ("the model has no metadata key ...").
    const char * str_by_name(const char * key) const;    // a string key
    double number_by_name(const char * key) const;       // any numeric or bool key
    bool ints_by_name(const char * key, std::vector<int64_t> & out) const;  // false: absent, not integers

  private:
    int64_t lookup(const char * name) const;  // -1 when absent; else sets ctx_ to the context holding it
    int64_t find(kv key, bool required) const;
    std::vector<const gguf_context *> ctxs_;
    mutable const gguf_context * ctx_ = nullptr;
};

}  // namespace mllama
