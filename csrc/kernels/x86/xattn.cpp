// Attention of a batch's query tokens over a long F16 K/V cache (see kernels/dispatch.h), its driver: the
// cross-attention of decoding and prefill, over every image key of the sequence, and the self-attention over the
// KV caches (graph/decoder.cpp: a decode batch's rows each over its own sequence's cells). ggml's CPU flash
// attention walks every query head over every key with F16 dot products; here each thread takes KV heads of a
// chunk of tokens (one in decode), reads each key and value row once for the whole query group (GQA) and, from
// L1/L2, for the chunk's other tokens, skips masked keys, and accumulates in F32 (figures in bench/README.md).
// The block step is xattn_avx512.cpp's in the AVX-512 BF16 family, else xattn_avx2.cpp's (an earlier AVX-512
// form, one dot product per key and head, each reduced across its register, had taken 1.7-2x the AVX2 form's
// time on Zen 5).
// Prefill's batches of k_xattn_tile_min_tokens or more go to AMX tiles where the graph asks for them
// (kernels/x86/xattn_amx.cpp).
#include "kernels/dispatch.h"

#if MLLAMA_X86_KERNELS  // the whole file: x86-64 only (CMake adds it only there)

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

// seen[i] = whether some token t0..t1 sees key j0 + i (its mask row is not -inf there), i < n.
template <class MaskRow>
void seen_keys(const MaskRow & mask_row, int64_t t0, int64_t t1, int64_t j0, int64_t n, bool * seen) {
    std::fill(seen, seen + n, false);
    for (int64_t t = t0; t < t1; ++t) {
        const ggml_fp16_t * row = mask_row(t) + j0;
        for (int64_t i = 0; i < n; ++i) seen[i] = seen[i] || row[i] != k_f16_neg_inf;
    }
}

// KV heads h0..h1 of tokens t0..t1, keys in the outer loop (a block of every head, then the next block): the
// tokens' mask rows are read once a block, and with head-major caches (a head's keys adjacent, runtime/context.h)
// heads in the outer loop were no faster (bench/README.md).
void attend_heads(ggml_tensor * dst, const shape & s, group_block_fn group_block, bool chunk_step, int64_t h0,
                  int64_t h1, int64_t t0, int64_t t1) {
    const ggml_tensor * q = dst->src[0], * mask = dst->src[3];
    const int64_t n_q = (h1 - h0) * s.G, n_t = t1 - t0;  // query heads per token, tokens
    std::vector<float> buf(static_cast<size_t>(2 * n_t * n_q * s.D));
    std::vector<query_state> qs(static_cast<size_t>(n_t * n_q));  // token-major: qs[(t - t0) n_q + i]
    for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < n_q; ++i) {
            const int64_t at = (t - t0) * n_q + i;
            const char * row = static_cast<const char *>(q->data) + (h0 * s.G + i) * q->nb[1] + t * q->nb[2];
            const auto * qr = reinterpret_cast<const float *>(row);
            float * mem = buf.data() + 2 * at * s.D;
            qs[at] = {mem, mem + s.D, -std::numeric_limits<float>::infinity(), 0.0f};
            std::copy(qr, qr + s.D, qs[at].q);
        }
    auto mask_row = [&](int64_t t) {
        return reinterpret_cast<const ggml_fp16_t *>(static_cast<const char *>(mask->data) + t * mask->nb[1]);
    };
    // the chunk's rows of each KV head for the chunk step: its tokens' query states and mask rows, token-major
    chunk_step = chunk_step && n_t > 1;
    std::vector<query_state *> rows(static_cast<size_t>(chunk_step ? n_t * n_q : 0));
    std::vector<const ggml_fp16_t *> mrows(rows.size());
    for (size_t r = 0; r < rows.size(); ++r) {
        const int64_t hg = static_cast<int64_t>(r) / (n_t * s.G), t = static_cast<int64_t>(r) / s.G % n_t;
        rows[r] = &qs[static_cast<size_t>(t * n_q + hg * s.G + static_cast<int64_t>(r) % s.G)];
        mrows[r] = mask_row(t0 + t);
    }
    bool seen[2][k_block];  // keys of this block / the next that some token of the chunk sees
    seen_keys(mask_row, t0, t1, 0, std::min(k_block, s.n_kv), seen[0]);
    for (int64_t j0 = 0, b = 0; j0 < s.n_kv; j0 += k_block, ++b) {
        const int64_t n = std::min(k_block, s.n_kv - j0), n_next = std::clamp<int64_t>(s.n_kv - j0 - n, 0, k_block);
        const bool * now = seen[b & 1];
        bool * next = seen[(b + 1) & 1];
        seen_keys(mask_row, t0, t1, j0 + n, n_next, next);
        // a block no token sees (the tiles a 1-tile image lacks) is neither read nor prefetched
        if (std::none_of(now, now + n, [](bool x) { return x; })) continue;
        for (int64_t h = h0; chunk_step && h < h1; ++h) {
            const size_t first = static_cast<size_t>((h - h0) * n_t * s.G);
            chunk_block_avx2(dst, s, h, rows.data() + first, mrows.data() + first, n_t * s.G, j0, n, next);
        }
        for (int64_t h = h0; !chunk_step && h < h1; ++h)
            for (int64_t t = t0; t < t1; ++t) {
                group_block(dst, s, h, mask_row(t), j0, n, qs.data() + (t - t0) * n_q + (h - h0) * s.G,
                            t == t0 ? next : nullptr);
            }
    }
    for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < n_q; ++i) {  // dst [D * Hq, T]; no live key: 0
            const query_state & st = qs[(t - t0) * n_q + i];
            auto * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t * dst->nb[1]) +
                         (h0 * s.G + i) * s.D;
            const float inv = st.l > 0.0f ? 1.0f / st.l : 0.0f;
            for (int64_t d = 0; d < s.D; ++d) out[d] = st.o[d] * inv;
        }
}

// Work units: (chunk of tokens, range of KV heads), unit u on thread u % nth. Chunks of up to k_token_chunk tokens,
// fewer where the units would not give every thread one (a decode batch of 8 rows on 16 threads: chunks of 4);
// each chunk's heads in as few contiguous ranges as give every thread a unit (one decode row: the heads split
// across the threads; a prefill: whole chunks, every head's part of a key row read together). Chunks go round the
// threads because they differ: a causal prefill's later chunks see more keys, a decode batch's sequences differ
// in length (contiguous runs of chunks had given one of two threads 3/4 of the work of a prompt's first 512-token
// part).
// Caches of several sequences (k, v [D, Hkv, n_kv, T]: token t reads sequence t's) take chunks of one token, each
// through a copy of dst whose k and v are that sequence's [D, Hkv, n_kv] (the block steps read them from dst).
void attend(ggml_tensor * dst, int ith, int nth, void * tiles) {
    if (tiles) return attend_tiles(dst, ith, nth);
    const shape s = shape_of(dst->src[0], dst->src[1]);
    const group_block_fn group_block =
        kernel_family() == cpu_family::avx512_bf16 ? group_block_avx512 : group_block_avx2;
    const bool chunk_step = kernel_family() == cpu_family::avx2;  // several tokens' rows at once (xattn.h)
    const bool per_token_caches = dst->src[1]->ne[3] > 1;
    const int64_t chunk = per_token_caches ? 1 : std::clamp<int64_t>(s.T * s.Hkv / nth, 1, k_token_chunk);
    const int64_t n_chunks = (s.T + chunk - 1) / chunk;
    const int64_t parts = std::min(s.Hkv, (nth + n_chunks - 1) / n_chunks);  // head ranges per chunk
    const int64_t per = (s.Hkv + parts - 1) / parts;
    for (int64_t u = ith; u < n_chunks * parts; u += nth) {
        const int64_t c = u / parts, h0 = u % parts * per, h1 = std::min(s.Hkv, h0 + per);
        if (h0 >= h1) continue;
        if (per_token_caches) {  // token c's own caches
            ggml_tensor k = *dst->src[1], v = *dst->src[2], one = *dst;
            k.data = static_cast<char *>(k.data) + c * k.nb[3];
            v.data = static_cast<char *>(v.data) + c * v.nb[3];
            k.ne[3] = v.ne[3] = 1;
            one.src[1] = &k, one.src[2] = &v;
            attend_heads(&one, s, group_block, chunk_step, h0, h1, c, c + 1);
        } else {
            attend_heads(dst, s, group_block, chunk_step, h0, h1, c * chunk, std::min(s.T, (c + 1) * chunk));
        }
    }
}

}  // namespace

bool cache_attention_supported(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v,
                               const ggml_tensor * mask) {
    if (!mask) return false;
    const shape s = shape_of(q, k);
    const bool types = q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 &&
                       mask->type == GGML_TYPE_F16 && q->nb[0] == sizeof(float) && k->nb[0] == sizeof(ggml_fp16_t) &&
                       v->nb[0] == sizeof(ggml_fp16_t);
    const bool heads = s.D % 16 == 0 && s.D <= k_xattn_max_head_dim && s.Hq % s.Hkv == 0 && s.G <= k_xattn_max_group;
    const bool caches = v->ne[0] == s.D && v->ne[1] == s.Hkv && v->ne[2] == s.n_kv && v->ne[3] == k->ne[3] &&
                        (k->ne[3] == 1 || k->ne[3] == s.T) && q->ne[3] == 1;  // one cache, or one per token
    const bool masks = mask->ne[0] >= s.n_kv && mask->ne[1] >= s.T && mask->ne[2] == 1 && mask->ne[3] == 1;
    return kernel_family() != cpu_family::none && types && heads && caches && masks;
}

ggml_tensor * cache_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                              float scale, bool tiles) {
    // the scale goes on the query in the graph (the same F32 products the kernel would take), so the
    // op needs no parameters; userdata non-null: on AMX tiles
    const bool on_tiles = tiles && amx_tiles_available() && q->ne[2] >= k_xattn_tile_min_tokens && q->ne[0] % 32 == 0 &&
                          k->ne[3] == 1;
    static int tiles_tag;
    ggml_tensor * args[] = {ggml_scale(ctx, q, scale), k, v, mask};  // q: [D, Hq, T]
    return ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0] * q->ne[1], q->ne[2], 1, 1, args, /*n_args=*/4, attend,
                          GGML_N_TASKS_MAX, on_tiles ? &tiles_tag : nullptr);  // [D * Hq, T]
}

}  // namespace mllama

#endif  // MLLAMA_X86_KERNELS
