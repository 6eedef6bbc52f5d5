// The activations of the AVX2 quantized products (kernels/x86/qmm_q6k_avx2.cpp, qmm_q4k_avx2.cpp): each row
// quantized to ggml's Q8_K values (its rule: int8 blocks of 256, scale -127 / the value of largest magnitude,
// round half to even) in natural order, once per product.
#pragma once

#include <cstdint>

struct ggml_tensor;

namespace mllama {

// One row's 256 activations. 320 bytes: rows stay 32-byte aligned.
struct q8k_block {
    int8_t qs[256];
    int16_t bsums[16];       // the sum of each 16 consecutive qs
    uint32_t bsum_pairs[4];  // for the Q4_K mins: the sums of qs 64p..64p+31 and 64p+32..64p+63 as an int16 pair
    float pad[4];            // d (x ~ d qs) is in q6k::activation_scales
};
static_assert(sizeof(q8k_block) == 320, "activation block layout");

// ggml custom op: dst->src[0] = x [K, N] F32 (K % 256 == 0) -> dst: N rows of K / 256 blocks
// (kernels/x86/q6k_block.h's activation_rows).
void q8k_quantize_rows_avx2(ggml_tensor * dst, int ith, int nth, void * userdata);

}  // namespace mllama
