// ggml's own type table and quantizer, exposed so the Python converter writes every type ggml knows.
#pragma once

#include "mllama.h"

#include <cstdint>

namespace mllama {

mllama_type_info type_info(int32_t type);
// Types the runtime accepts for matmul weights (ggml CPU kernels exist for them).
bool is_weight_type(int32_t type);
uint64_t quantize(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst, uint64_t dst_size);
void dequantize(int32_t type, const void * src, uint64_t src_size, float * dst, int64_t n_elements);

}  // namespace mllama
