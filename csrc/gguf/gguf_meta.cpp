#include "gguf/gguf_meta.h"

#include "common/error.h"
#include "gguf.h"

#include <cmath>
#include <limits>

namespace mllama {

int64_t gguf_meta::find(kv key, bool required) const {
    for (const gguf_context * ctx : ctxs_) {
        const int64_t id = gguf_find_key(ctx, key_name(key));
        if (id >= 0) {
            ctx_ = ctx;
            return id;
        }
    }
    if (required) fail(MLLAMA_ERR_MODEL, "missing metadata key '%s'", key_name(key));
    return -1;
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

bool scalar_int(const gguf_context * ctx, int64_t id, enum gguf_type type, int64_t & out) {
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

bool gguf_meta::get_bool(kv key, bool fallback) const {
    const int64_t id = find(key, false);
    if (id < 0) return fallback;
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_BOOL) fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not a bool", key_name(key));
    return gguf_get_val_bool(ctx_, id);
}

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
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY) fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not an array", key_name(key));
    return static_cast<int64_t>(gguf_get_arr_n(ctx_, id));
}

template <typename T>
static std::vector<int64_t> widen(const void * data, size_t n) {
    const T * p = static_cast<const T *>(data);
    return std::vector<int64_t>(p, p + n);
}

std::vector<int64_t> gguf_meta::get_int_array(kv key) const {
    const int64_t n = array_size(key);
    if (n < 0) fail(MLLAMA_ERR_MODEL, "missing metadata key '%s'", key_name(key));
    const int64_t id = find(key, true);
    const void * data = n ? gguf_get_arr_data(ctx_, id) : nullptr;
    switch (gguf_get_arr_type(ctx_, id)) {
        case GGUF_TYPE_INT32: return widen<int32_t>(data, n);
        case GGUF_TYPE_UINT32: return widen<uint32_t>(data, n);
        case GGUF_TYPE_INT64: return widen<int64_t>(data, n);
        case GGUF_TYPE_INT16: return widen<int16_t>(data, n);
        case GGUF_TYPE_UINT16: return widen<uint16_t>(data, n);
        case GGUF_TYPE_INT8: return widen<int8_t>(data, n);
        case GGUF_TYPE_UINT8: return widen<uint8_t>(data, n);
        default: fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not an integer array", key_name(key));
    }
}

std::vector<float> gguf_meta::get_float_array(kv key) const {
    const int64_t n = array_size(key);
    if (n < 0) fail(MLLAMA_ERR_MODEL, "missing metadata key '%s'", key_name(key));
    const int64_t id = find(key, true);
    if (gguf_get_arr_type(ctx_, id) != GGUF_TYPE_FLOAT32) fail(MLLAMA_ERR_MODEL, "metadata key '%s' is not a float32 array", key_name(key));
    const float * p = static_cast<const float *>(n ? gguf_get_arr_data(ctx_, id) : nullptr);
    std::vector<float> out(p, p + n);
    for (float v : out) {
        if (!std::isfinite(v)) fail(MLLAMA_ERR_MODEL, "metadata key '%s' holds a non-finite value", key_name(key));
    }
    return out;
}

}  // namespace mllama
