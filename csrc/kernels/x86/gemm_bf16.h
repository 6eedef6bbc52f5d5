// What the two BF16 GEMM paths share (kernels/x86/gemm_bf16.cpp: AVX-512 BF16 dot products;
// kernels/x86/gemm_amx.cpp: AMX tiles): the packed weight layout and the epilogue.
//
// Weights are packed per call into panels of k_panel output channels, 16 channels and one k pair
// per 64 bytes: Wp[panel][k/2][m % 64] = (W[m][k], W[m][k+1]). That is a row of an AVX-512 register
// of pairs and, 16 pair rows at a time, an AMX B tile (16 pairs x 16 channels).
#pragma once

#include "kernels/x86/cache_lines.h"
#include "kernels/x86/simd_math.h"

#include <algorithm>
#include <cstdint>

struct ggml_tensor;

namespace mllama::gemm {

constexpr int64_t k_panel = 64;  // output channels per weight panel (4 groups of 16)

// What follows the product. The custom op receives a pointer to a static entry (gemm_bf16.cpp), valid
// for as long as the process, so any graph built with it stays valid.
struct epilogue {
    bool gelu;      // exact GELU after the bias
    bool bf16_out;  // BF16 output (the input of a following bf16_linear), else F32
    bool tiles;     // AMX tiles (gemm_amx.cpp) where K allows, else AVX-512 BF16 dot products
};

// The packed panels start at the first cache-line boundary of their tensor's data, which holds k_panel_pad bytes
// more (kernels/x86/cache_lines.h).
constexpr int64_t k_panel_pad = k_cache_line;
inline uint32_t * aligned_panels(void * data) { return line_aligned<uint32_t>(data); }

inline int64_t panel_groups(int64_t M, int64_t panel) {  // groups of 16 channels in a panel
    return std::min<int64_t>(k_panel, M - panel * k_panel) / 16;
}

// 16 sums of channels c0..c0+15 of one token: + bias (null: none), GELU, stored as F32 or BF16 at
// out (the token's output row) + c0.
MLLAMA_AVX512_TARGET inline void finish16(__m512 v, const float * bias, const epilogue & ep, char * out, int64_t c0) {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + c0));
    if (ep.gelu) v = simd::gelu512(v);
    if (ep.bf16_out) _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + c0 * 2), (__m256i) _mm512_cvtneps_pbh(v));
    else _mm512_storeu_ps(reinterpret_cast<float *>(out) + c0, v);
}

// dst [M, N] = Wp x^T on AMX tiles, tokens split across threads; dst->src = {Wp, x [K, N] BF16 with
// K % 32 == 0, bias [M] F32 or null}. Runs emulated tiles when amx_tiles_emulated() (kernels/dispatch.h).
void gemm_tiles(ggml_tensor * dst, int ith, int nth, const epilogue & ep);

}  // namespace mllama::gemm
