#include "gguf/quant.h"

#include "common/error.h"
#include "ggml.h"

#include <algorithm>
#include <cstdio>
#include <mutex>

namespace mllama {

static const ggml_type_traits * traits_of(int32_t type) {
    if (type < 0 || type >= GGML_TYPE_COUNT) fail(MLLAMA_ERR_INVALID_ARGUMENT, "unknown ggml type %d", type);
    const ggml_type_traits * traits = ggml_get_type_traits(static_cast<ggml_type>(type));
    if (!traits || !traits->type_name || traits->blck_size <= 0 || traits->type_size == 0) {
        fail(MLLAMA_ERR_UNSUPPORTED, "ggml type %d is not available in this build", type);
    }
    return traits;
}

bool is_weight_type(int32_t type) {
    switch (type) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ2_XXS: case GGML_TYPE_IQ2_XS: case GGML_TYPE_IQ2_S: case GGML_TYPE_IQ3_XXS: case GGML_TYPE_IQ3_S:
        case GGML_TYPE_IQ1_S: case GGML_TYPE_IQ1_M: case GGML_TYPE_IQ4_NL: case GGML_TYPE_IQ4_XS:
            return true;
        default:
            return false;
    }
}

// Types the converter writes: weight types ggml can produce from F32 without an importance matrix.
// The i-quants are left out on purpose: without an imatrix their quality is poor.
static bool can_quantize(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
            return !ggml_quantize_requires_imatrix(type);
        default:
            return false;
    }
}

mllama_type_info type_info(int32_t type) {
    const ggml_type_traits * traits = traits_of(type);
    const ggml_type t = static_cast<ggml_type>(type);
    mllama_type_info info{};
    std::snprintf(info.name, sizeof(info.name), "%s", traits->type_name);
    info.block_size = traits->blck_size;
    info.type_size = traits->type_size;
    info.is_quantized = ggml_is_quantized(t) ? 1 : 0;
    info.requires_imatrix = ggml_quantize_requires_imatrix(t) ? 1 : 0;
    info.can_quantize = can_quantize(t) && !info.requires_imatrix ? 1 : 0;
    return info;
}

uint64_t quantize(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst, uint64_t dst_size) {
    const mllama_type_info info = type_info(type);
    const ggml_type t = static_cast<ggml_type>(type);
    if (!info.can_quantize) {
        fail(MLLAMA_ERR_UNSUPPORTED, "cannot quantize to %s without an importance matrix", info.name);
    }
    if (!src || !dst || n_rows < 0 || n_per_row <= 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "invalid quantize arguments");
    if (n_per_row % info.block_size != 0) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "rows of %lld values are not a whole number of %s blocks (%lld)", (long long) n_per_row,
             info.name, (long long) info.block_size);
    }
    const uint64_t need = static_cast<uint64_t>(n_rows) * ggml_row_size(t, n_per_row);
    if (dst_size < need) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "destination holds %llu bytes, %llu needed", (unsigned long long) dst_size,
             (unsigned long long) need);
    }
    // ggml_quantize_init fills shared lookup tables; it is safe to call repeatedly but not concurrently.
    static std::mutex init_mutex;
    {
        std::lock_guard<std::mutex> lock(init_mutex);
        ggml_quantize_init(t);
    }
    return ggml_quantize_chunk(t, src, dst, 0, n_rows, n_per_row, nullptr);
}

void dequantize(int32_t type, const void * src, uint64_t src_size, float * dst, int64_t n_elements) {
    const ggml_type_traits * traits = traits_of(type);
    const ggml_type t = static_cast<ggml_type>(type);
    if (!src || !dst || n_elements < 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "invalid dequantize arguments");
    if (n_elements % traits->blck_size != 0) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "%lld values are not a whole number of %s blocks", (long long) n_elements,
             traits->type_name);
    }
    const uint64_t need = ggml_row_size(t, n_elements);
    if (src_size < need) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "source holds %llu bytes, %llu needed", (unsigned long long) src_size,
             (unsigned long long) need);
    }
    if (t == GGML_TYPE_F32) {
        const float * in = static_cast<const float *>(src);
        std::copy(in, in + n_elements, dst);
        return;
    }
    if (!traits->to_float) fail(MLLAMA_ERR_UNSUPPORTED, "type %s cannot be converted to float", traits->type_name);
    traits->to_float(src, dst, n_elements);
}

}  // namespace mllama
