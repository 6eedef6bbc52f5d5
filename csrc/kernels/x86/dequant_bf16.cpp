// Quantized weights as BF16 for the BF16 GEMM (see kernels/dispatch.h's dequantize_bf16): the cross-attention K
// and V projections of an image multiply a [n_embd -> n_kv_embd] matrix by every vision token (max_tiles x
// n_positions rows), where ggml's quantized GEMM (8-bit activations, integer dot products) ran at half the BF16
// GEMM's speed (bench/README.md). The weights are decoded once per call, as ggml decodes them (d * scale * q -
// dmin * min in F32), and rounded to BF16 (relative 2^-9, below the Q8_K rounding of the activations that ggml's
// product applies instead). Q4_K in ggml's repacked layout (block_q4_Kx8, kernels/x86/q4k_block.h) decodes here;
// any other quantized type in the file layout through ggml's own to_float.
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/q4k_block.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mllama {
namespace {

// One block_q4_Kx8 (channels 8g..8g+7 at one k offset) decoded: rows[c][i] = channel 8g + c's weight i of the block.
MLLAMA_AVX2_TARGET void decode_q4kx8(const q4k::q4kx8_block & blk, float (*rows)[q4k::k_block]) {
    __m128i sub[8];
    q4k::decode_scales(blk.scales, sub);  // sub[s]: [scale ch0-3, min ch0-3, scale ch4-7, min ch4-7]
    alignas(16) uint8_t packed[8][16];
    for (int s = 0; s < 8; ++s) _mm_store_si128(reinterpret_cast<__m128i *>(packed[s]), sub[s]);
    for (int c = 0; c < q4k::k_interleave; ++c) {
        const float d = ggml_fp16_to_fp32(blk.d[c]), dmin = ggml_fp16_to_fp32(blk.dmin[c]);
        const int scale_byte = c < 4 ? c : c + 4, min_byte = scale_byte + 4;
        for (int j = 0; j < 4; ++j) {  // qs bytes 32j..32j+31: weights 64j + l (low nibbles), 64j + 32 + l (high)
            const float d_lo = d * packed[2 * j][scale_byte], m_lo = dmin * packed[2 * j][min_byte];
            const float d_hi = d * packed[2 * j + 1][scale_byte], m_hi = dmin * packed[2 * j + 1][min_byte];
            for (int l = 0; l < 32; ++l) {
                const int o = 32 * j + l;
                const uint8_t q = blk.qs[(o / 8 * 8 + c) * 8 + o % 8];  // channel c's qs bytes 8t..8t+7: chunk 8t + c
                rows[c][64 * j + l] = d_lo * static_cast<float>(q & 0xF) - m_lo;
                rows[c][64 * j + 32 + l] = d_hi * static_cast<float>(q >> 4) - m_hi;
            }
        }
    }
}

// dst [K, M] BF16 <- w (userdata) repacked Q4_K; groups of 8 channels split across threads.
void dequantize_q4kx8(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * w = static_cast<const ggml_tensor *>(userdata);
    const int64_t K = w->ne[0], n_blocks = K / q4k::k_block, n_groups = w->ne[1] / q4k::k_interleave;
    const auto * blocks = static_cast<const q4k::q4kx8_block *>(w->data);
    alignas(64) float rows[q4k::k_interleave][q4k::k_block];
    for (int64_t g = ith; g < n_groups; g += nth) {
        for (int64_t b = 0; b < n_blocks; ++b) {
            decode_q4kx8(blocks[g * n_blocks + b], rows);
            for (int64_t c = 0; c < q4k::k_interleave; ++c) {
                char * row = static_cast<char *>(dst->data) + (g * q4k::k_interleave + c) * dst->nb[1];
                ggml_fp32_to_bf16_row(rows[c], reinterpret_cast<ggml_bf16_t *>(row) + b * q4k::k_block,
                                      q4k::k_block);  // to nearest even
            }
        }
    }
}

// dst [K, M] BF16 <- w (userdata) in the file layout of a quantized type; rows split across threads.
void dequantize_rows(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * w = static_cast<const ggml_tensor *>(userdata);
    const ggml_type_traits * traits = ggml_get_type_traits(w->type);
    std::vector<float> values(static_cast<size_t>(w->ne[0]));
    for (int64_t m = ith; m < w->ne[1]; m += nth) {
        traits->to_float(static_cast<const char *>(w->data) + m * w->nb[1], values.data(), w->ne[0]);
        char * row = static_cast<char *>(dst->data) + m * dst->nb[1];
        ggml_fp32_to_bf16_row(values.data(), reinterpret_cast<ggml_bf16_t *>(row), w->ne[0]);
    }
}

}  // namespace

bool dequantize_bf16_supported(const ggml_tensor * w) {
    if (kernel_family() == cpu_family::none || !w || !ggml_is_quantized(w->type) || w->ne[2] != 1 || w->ne[3] != 1 ||
        !ggml_is_contiguous(w) || w->ne[1] % 16 != 0 || w->ne[0] % 2 != 0 || !w->buffer) {
        return false;
    }
    if (q4k::in_repack_buffer(w)) {  // ggml's repacked layout (in CPU memory, not "host" to ggml): Q4_K only
        return w->type == GGML_TYPE_Q4_K && w->ne[0] % q4k::k_block == 0 && w->ne[1] % q4k::k_interleave == 0 &&
               ggml_type_size(GGML_TYPE_Q4_K) * q4k::k_interleave == sizeof(q4k::q4kx8_block);
    }
    return w->extra == nullptr && ggml_backend_buffer_is_host(w->buffer) && ggml_get_type_traits(w->type)->to_float;
}

ggml_tensor * dequantize_bf16(ggml_context * ctx, ggml_tensor * w, ggml_tensor * anchor) {
    // w goes in by userdata (ggml's CPU backend lets the repack buffer type decide which ops read its tensors,
    // and it accepts only mul_mat; w lives as long as the model); anchor, the product's input, is the op's
    // source, so that the scheduler puts the op with the product
    const ggml_custom_op_t op = q4k::in_repack_buffer(w) ? dequantize_q4kx8 : dequantize_rows;
    return ggml_custom_4d(ctx, GGML_TYPE_BF16, w->ne[0], w->ne[1], 1, 1, &anchor, /*n_args=*/1, op, GGML_N_TASKS_MAX,
                          w);  // [K, M]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
