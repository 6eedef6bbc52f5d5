// Attention of a few query tokens over a long F16 K/V cache (see kernels/dispatch.h), its AVX-512 form:
// the cross-attention of decoding, over every image key of the sequence. ggml's CPU flash attention
// walks every query head over every key with F16 dot products; here each thread takes one KV head
// and token, reads each key and value row once for the whole query group (GQA), skips masked keys,
// and accumulates in F32 (figures in bench/README.md).
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

#include "kernels/x86/simd_math.h"
#include "kernels/x86/xattn.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace mllama {
namespace {

using namespace xattn;

MLLAMA_AVX512_TARGET inline float dot(const float * q, const ggml_fp16_t * k, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(k + d))), acc);
    return _mm512_reduce_add_ps(acc);
}

// o += sum_j p[j] v_j over the keys of a block (p[j] == 0: masked, skipped).
MLLAMA_AVX512_TARGET inline void accumulate(float * o, const float * p, const ggml_tensor * v, int64_t h, int64_t j0, int64_t n, int64_t D) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 4 zmm of the output at a time
        const int64_t w = std::min<int64_t>(64, D - d0) / 16;
        __m512 acc[4];
        for (int64_t i = 0; i < w; ++i) acc[i] = _mm512_loadu_ps(o + d0 + 16 * i);
        for (int64_t jj = 0; jj < n; ++jj) {
            if (p[jj] == 0.0f) continue;
            const __m512 pj = _mm512_set1_ps(p[jj]);
            const ggml_fp16_t * vr = row_of(v, h, j0 + jj) + d0;
            for (int64_t i = 0; i < w; ++i)
                acc[i] = _mm512_fmadd_ps(pj, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vr + 16 * i))), acc[i]);
        }
        for (int64_t i = 0; i < w; ++i) _mm512_storeu_ps(o + d0 + 16 * i, acc[i]);
    }
}

// Scores, softmax step and value accumulation of one query group (KV head h) over keys j0..j0+n.
MLLAMA_AVX512_TARGET void group_block(const ggml_tensor * dst, const shape & s, int64_t h, const ggml_fp16_t * mrow, int64_t j0,
                                      int64_t n, query_state * qs) {
    const ggml_tensor * k = dst->src[1], * v = dst->src[2];
    alignas(64) float sc[k_xattn_max_group][k_block];
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t g = 0; g < s.G; ++g)
        for (int64_t i = 0; i < k_block; i += 16) _mm512_store_ps(sc[g] + i, neg_inf);
    for (int64_t jj = 0; jj < n; ++jj) {
        const float bias = _cvtsh_ss(mrow[j0 + jj]);
        if (bias == -std::numeric_limits<float>::infinity()) continue;
        const ggml_fp16_t * kr = row_of(k, h, j0 + jj);
        for (int64_t g = 0; g < s.G; ++g) sc[g][jj] = dot(qs[g].q, kr, s.D) + bias;
    }
    for (int64_t g = 0; g < s.G; ++g) {
        query_state & st = qs[g];
        __m512 mx = neg_inf;
        for (int64_t i = 0; i < k_block; i += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sc[g] + i));
        const float m_new = std::max(st.m, _mm512_reduce_max_ps(mx));
        if (m_new == -std::numeric_limits<float>::infinity()) continue;  // all masked so far
        if (m_new != st.m) {
            const float alpha = std::exp(st.m - m_new);  // 0 on the first live block
            for (int64_t d = 0; d < s.D; ++d) st.o[d] *= alpha;
            st.l *= alpha;
            st.m = m_new;
        }
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < k_block; i += 16) {  // masked keys: exp(-inf) = 0
            const __m512 p = simd::exp512(_mm512_sub_ps(_mm512_load_ps(sc[g] + i), _mm512_set1_ps(m_new)));
            _mm512_store_ps(sc[g] + i, p);
            sum = _mm512_add_ps(sum, p);
        }
        st.l += _mm512_reduce_add_ps(sum);
        accumulate(st.o, sc[g], v, h, j0, n, s.D);
    }
}

// KV heads h0..h1 and token t. Keys in the outer loop: the cache holds a key's heads side by
// side, so the threads (each with its own heads) stream the cache instead of striding through it.
void attend_heads(ggml_tensor * dst, const shape & s, int64_t h0, int64_t h1, int64_t t, group_block_fn group_block) {
    const ggml_tensor * q = dst->src[0], * mask = dst->src[3];
    const int64_t n_q = (h1 - h0) * s.G;
    std::vector<float> buf(static_cast<size_t>(2 * n_q * s.D));
    std::vector<query_state> qs(static_cast<size_t>(n_q));
    for (int64_t i = 0; i < n_q; ++i) {
        const auto * qr = reinterpret_cast<const float *>(static_cast<const char *>(q->data) + (h0 * s.G + i) * q->nb[1] + t * q->nb[2]);
        qs[i] = {buf.data() + 2 * i * s.D, buf.data() + (2 * i + 1) * s.D, -std::numeric_limits<float>::infinity(), 0.0f};
        std::copy(qr, qr + s.D, qs[i].q);
    }
    const auto * mrow = reinterpret_cast<const ggml_fp16_t *>(static_cast<const char *>(mask->data) + t * mask->nb[1]);
    for (int64_t j0 = 0; j0 < s.n_kv; j0 += k_block)
        for (int64_t h = h0; h < h1; ++h) group_block(dst, s, h, mrow, j0, std::min(k_block, s.n_kv - j0), qs.data() + (h - h0) * s.G);
    for (int64_t i = 0; i < n_q; ++i) {  // dst [D * Hq, T]; no live key: 0
        auto * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t * dst->nb[1]) + (h0 * s.G + i) * s.D;
        const float inv = qs[i].l > 0.0f ? 1.0f / qs[i].l : 0.0f;
        for (int64_t d = 0; d < s.D; ++d) out[d] = qs[i].o[d] * inv;
    }
}

// The family's group_block, chosen when the graph is built (kernel_family() may change between graphs).
constexpr group_block_fn k_group_blocks[] = {group_block, group_block_avx2};

// Each thread takes a contiguous range of (token, KV head) pairs, cut into per-token head ranges;
// userdata: the family's entry of k_group_blocks.
void attend(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const group_block_fn group_block = *static_cast<const group_block_fn *>(userdata);
    const shape s = shape_of(dst->src[0], dst->src[1]);
    const int64_t total = s.Hkv * s.T, per = (total + nth - 1) / nth;
    const int64_t w0 = std::min(total, per * ith), w1 = std::min(total, w0 + per);
    for (int64_t w = w0; w < w1;) {
        const int64_t t = w / s.Hkv, h0 = w % s.Hkv, h1 = std::min(s.Hkv, h0 + (w1 - w));
        attend_heads(dst, s, h0, h1, t, group_block);
        w += h1 - h0;
    }
}

}  // namespace

bool decode_attention_supported(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v, const ggml_tensor * mask) {
    const shape s = shape_of(q, k);
    return kernel_family() != cpu_family::none && q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 &&
           mask && mask->type == GGML_TYPE_F16 && q->nb[0] == sizeof(float) && k->nb[0] == sizeof(ggml_fp16_t) &&
           v->nb[0] == sizeof(ggml_fp16_t) && s.D % 16 == 0 && s.D <= k_xattn_max_head_dim && s.Hq % s.Hkv == 0 &&
           s.G <= k_xattn_max_group && v->ne[0] == s.D && v->ne[1] == s.Hkv && v->ne[2] == s.n_kv && mask->ne[0] >= s.n_kv &&
           mask->ne[1] >= s.T;
}

ggml_tensor * decode_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask, float scale) {
    // the scale goes on the query in the graph (the same F32 products the kernel would take), so the
    // op needs no parameters
    ggml_tensor * args[] = {ggml_scale(ctx, q, scale), k, v, mask};  // q: [D, Hq, T]
    const group_block_fn * family = &k_group_blocks[kernel_family() == cpu_family::avx2 ? 1 : 0];
    return ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0] * q->ne[1], q->ne[2], 1, 1, args, /*n_args=*/4, attend,
                          GGML_N_TASKS_MAX, const_cast<group_block_fn *>(family));  // [D * Hq, T]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
