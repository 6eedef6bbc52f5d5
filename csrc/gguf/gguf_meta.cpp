#include "gguf/gguf_meta.h"

#include "common/error.h"
#include "gguf.h"

#include <cmath>
#include <limits>

namespace mllama {

// Any integer-typed value (u8..i64; u64 only if it fits int64) as int64; false for other types.
static bool scalar_int(const gguf_context * ctx, int64_t id, enum gguf_type type, int64_t & out) {
    switch (type) {
        case GGUF_TYPE_UINT8: out = gguf_get_val_u8(ctx, id); return true;
        case GGUF_TYPE_INT8: out = gguf_get_val_i8(ctx, id); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(ctx, id); return true;
        case GGUF_TYPE_INT16: out = gguf_get_val_i16(ctx, id); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ctx, id); return true;
        case GGUF_TYPE_INT32: out = gguf_get_val_i32(ctx, id); return true;
        case GGUF_TYPE_INT64: out = gguf_get_val_i64(ctx, id); return true;
        case GGUF_TYPE_UINT64: {
            const uint64_t v = gguf_get_val_u64(ctx, id);
            if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
            out = static_cast<int64_t>(v);
            return true;
        }
        default: return false;
    }
}

template <typename T>
static void widen(const void * data, size_t n, std::vector<int64_t> & out) {
    const T * p = static_cast<const T *>(data);
    out.assign(p, p + n);
}

// The array `id` widened to int64 when its elements are integers; false for other element types.
static bool int_array(const gguf_context * ctx, int64_t id, std::vector<int64_t> & out) {
    const gguf_type type = gguf_get_arr_type(ctx, id);
    if (type == GGUF_TYPE_STRING || type == GGUF_TYPE_ARRAY) return false;  // (ggml asserts on their data)
    const size_t n = gguf_get_arr_n(ctx, id);
    const void * data = n ? gguf_get_arr_data(ctx, id) : nullptr;
    switch (type) {
        case GGUF_TYPE_INT32: widen<int32_t>(data, n, out); return true;
        case GGUF_TYPE_UINT32: widen<uint32_t>(data, n, out); return true;
        case GGUF_TYPE_INT64: widen<int64_t>(data, n, out); return true;
        case GGUF_TYPE_UINT64: widen<uint64_t>(data, n, out); return true;  // wraps above INT64_MAX
        case GGUF_TYPE_INT16: widen<int16_t>(data, n, out); return true;
        case GGUF_TYPE_UINT16: widen<uint16_t>(data, n, out); return true;
        case GGUF_TYPE_INT8: widen<int8_t>(data, n, out); return true;
        case GGUF_TYPE_UINT8: widen<uint8_t>(data, n, out); return true;
        default: return false;
    }
}

int64_t gguf_meta::lookup(const char * name) const {
    for (const gguf_context * ctx : ctxs_) {
        const int64_t id = gguf_find_key(ctx, name);
        if (id >= 0) {
            ctx_ = ctx;
            return id;
        }
    }
    return -1;
}

int64_t gguf_meta::find(kv key, bool required) const {
    const int64_t id = lookup(key_name(key));
    if (id < 0 && required) fail(MLLAMA_ERR_MODEL, "missing metadata key '%s'", key_name(key));
    return id;
}

int64_t gguf_meta::token_id(const std::string & text) const {
    const int64_t id = find(kv::TOK_TOKENS, false);
    if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx_, id) != GGUF_TYPE_STRING) return -1;
    const size_t n = gguf_get_arr_n(ctx_, id);
    for (size_t i = n; i-- > 0;) {  // special tokens sit at the end
        if (text == gguf_get_arr_str(ctx_, id, i)) return static_cast<int64_t>(i);
    }
    return -1;
}

bool gguf_meta::has(kv key) const { return find(key, false) >= 0; }

int64_t gguf_meta::get_int(kv key) const {
    const int64_t id = find(key, true);
    int64_t v = 0;
    if (!scalar_int(ctx_, id, gguf_get_kv_type(ctx_, id), v)) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' has type %s, expected an integer", key_name(key),
             gguf_type_name(gguf_get_kv_type(ctx_, id)));
    }
    return v;
}

int64_t gguf_meta::get_int(kv key, int64_t fallback) const { return has(key) ? get_int(key) : fallback; }

float gguf_meta::get_float(kv key) const {
    const int64_t id = find(key, true);
    const enum gguf_type type = gguf_get_kv_type(ctx_, id);
    double v = 0.0;
    int64_t iv = 0;
    if (type == GGUF_TYPE_FLOAT32) v = gguf_get_val_f32(ctx_, id);
    else if (type == GGUF_TYPE_FLOAT64) v = gguf_get_val_f64(ctx_, id);
    else if (scalar_int(ctx_, id, type, iv)) v = static_cast<double>(iv);
    else fail(MLLAMA_ERR_MODEL, "metadata key '%s' has type %s, expected a number", key_name(key), gguf_type_name(type));
    if (!std::isfinite(v)) fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not a finite number", key_name(key));
    return static_cast<float>(v);
}

float gguf_meta::get_float(kv key, float fallback) const { return has(key) ? get_float(key) : fallback; }

std::string gguf_meta::get_str(kv key) const {
    const int64_t id = find(key, true);
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_STRING) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' has type %s, expected a string", key_name(key),
             gguf_type_name(gguf_get_kv_type(ctx_, id)));
    }
    return gguf_get_val_str(ctx_, id);
}

std::string gguf_meta::get_str(kv key, const std::string & fallback) const { return has(key) ? get_str(key) : fallback; }

int64_t gguf_meta::array_size(kv key) const {
    const int64_t id = find(key, false);
    if (id < 0) return -1;
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not an array", key_name(key));
    }
    return static_cast<int64_t>(gguf_get_arr_n(ctx_, id));
}

std::vector<int64_t> gguf_meta::get_int_array(kv key) const {
    if (array_size(key) < 0) fail(MLLAMA_ERR_MODEL, "missing metadata key '%s'", key_name(key));
    std::vector<int64_t> out;
    if (!int_array(ctx_, find(key, true), out)) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not an integer array", key_name(key));
    }
    return out;
}

std::vector<float> gguf_meta::get_float_array(kv key) const {
    const int64_t n = array_size(key);
    if (n < 0) fail(MLLAMA_ERR_MODEL, "missing metadata key '%s'", key_name(key));
    const int64_t id = find(key, true);
    if (gguf_get_arr_type(ctx_, id) != GGUF_TYPE_FLOAT32) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not a float32 array", key_name(key));
    }
    const float * p = static_cast<const float *>(n ? gguf_get_arr_data(ctx_, id) : nullptr);
    std::vector<float> out(p, p + n);
    for (float v : out) {
        if (!std::isfinite(v)) fail(MLLAMA_ERR_MODEL, "metadata key '%s' holds a non-finite value", key_name(key));
    }
    return out;
}

std::vector<const char *> gguf_meta::str_array(kv key) const {
    const int64_t id = find(key, false);
    std::vector<const char *> out;
    if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx_, id) != GGUF_TYPE_STRING) return out;
    const size_t n = gguf_get_arr_n(ctx_, id);
    for (size_t i = 0; i < n; ++i) out.push_back(gguf_get_arr_str(ctx_, id, i));
    return out;
}

const char * gguf_meta::str_by_name(const char * key) const {
    const int64_t id = lookup(key);
    if (id < 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no metadata key '%s'", key);
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_STRING) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "metadata key '%s' is not a string", key);
    }
    return gguf_get_val_str(ctx_, id);
}

double gguf_meta::number_by_name(const char * key) const {
    const int64_t id = lookup(key);
    if (id < 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no metadata key '%s'", key);
    const gguf_type type = gguf_get_kv_type(ctx_, id);
    int64_t i = 0;
    if (scalar_int(ctx_, id, type, i)) return static_cast<double>(i);
    if (type == GGUF_TYPE_FLOAT32) return gguf_get_val_f32(ctx_, id);
    if (type == GGUF_TYPE_FLOAT64) return gguf_get_val_f64(ctx_, id);
    if (type == GGUF_TYPE_BOOL) return gguf_get_val_bool(ctx_, id) ? 1.0 : 0.0;
    fail(MLLAMA_ERR_INVALID_ARGUMENT, "metadata key '%s' is not a number", key);
}

bool gguf_meta::ints_by_name(const char * key, std::vector<int64_t> & out) const {
    const int64_t id = lookup(key);
    return id >= 0 && gguf_get_kv_type(ctx_, id) == GGUF_TYPE_ARRAY && int_array(ctx_, id, out);
}

}  // namespace mllama
