// The decode cross-attention kernel (csrc/kernels/x86/xattn.cpp, its block step in xattn_avx2.cpp and
// xattn_avx512.cpp) against softmax(q k^T scale + mask) v in double precision on the same inputs; built by
// tests/test_avx2_kernels.py with the kernels' sources.
//
//   xattn D Hq Hkv T n_kv [threads] [reps]
//
// Inputs: q [D, Hq, T] F32 random normal (x2: peaked rows too), k and v [D, Hkv, n_kv] F16, mask
// [n_kv, T] F16: key j of token t is hidden (-inf) when (7 j + t) % 5 == 0 or j lies in 64..127 (a
// whole block with no live key), gets bias 10 when j % 131 == 130 (after a block or more: every form must rescale
// what it summed before), -2 when j % 11 == 0, else 0; the last token of T > 1 sees
// no key (its output must be zeros). The kernel computes in F32 from the same F16 values, so per
// output |o - o_ref| <= 2 [rel sum_j p_j |v_j| + N u max_j |v_j|] / sum_j p_j, where rel = 2 gamma_D S
// (S = max_j sum_d |q_d k_jd|, the F32 scores' error moves a probability by twice it relatively) + 4u
// (the bias and the running maximum subtracted) + 4e-7 (e^x) + 2 gamma_N (the F32 sums of p v and of p)
// + 2u per softmax rescale (one per 64-key block), N u max|v| covers (s - m)'s rounding on the small
// probabilities (e^x u |x| <= u / e each); the 2 is margin. On AMX tiles (from k_xattn_tile_min_tokens tokens) the
// query and the key are rounded to BF16 too (2^-9 relative each: the scores' error grows by 2^-8 S), and so are the
// probability and the value in P V (2^-9 each), and 2^x is a polynomial (relative error 2.7e-6): rel gains
// 2^-8 S x 2 + 2 x 2^-9 and 3e-6 for 4e-7. Prints the largest error over the bound of each form of the block step
// and of the tiles: "avx2=<ratio> avx512=<ratio> amx=<ratio>" (avx512=none where the AVX-512 BF16 family does not
// run: the CPU lacks it or MLLAMA_AVX512=0; amx=none without tiles, hardware or MLLAMA_AMX_EMULATE=1, or fewer
// tokens), then with reps > 0 the median time of ggml's flash attention (F32 precision, as the decoder calls it)
// and of each form over reps runs, each on another copy of the cache when one fits in a cache (at least 256 MB per
// pass; XATTN_COPIES=n: n copies, 1 to time the arithmetic from the caches): "ggml_ms=... avx2_ms=... avx512_ms=...
// amx_ms=... cache_bytes=... copies=...". XATTN_ALL_LIVE=1: every key live, bias 0 (a 4-tile image's decode).
// k and v are viewed as [D, Hkv, n_kv] over both layouts of the runtime's image caches (runtime/context.h): each
// form's ratio is the larger of the two. The timed caches take the layout the runtime would give them here
// (head-major where kernels/dispatch.h's caches_head_major()), XATTN_LAYOUT=key or head another.
#include "kernels/dispatch.h"
#include "timing.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace mllama;

struct problem {
    int64_t D, Hq, Hkv, T, n_kv;
};

static float mask_bias(int64_t t, int64_t j, int64_t T) {
    static const bool all_live = std::getenv("XATTN_ALL_LIVE") != nullptr;  // timing as decode over a 4-tile image
    if (all_live) return 0.0f;
    if ((T > 1 && t == T - 1) || (7 * j + t) % 5 == 0 || (j >= 64 && j < 128)) return -std::numeric_limits<float>::infinity();
    if (j % 131 == 130) return 10.0f;  // a score far above the row's earlier ones: the running maximum moves
    return j % 11 == 0 ? -2.0f : 0.0f;
}

// A cache tensor [D, Hkv, n_kv], key-major (a key's heads adjacent) or head-major (a head's keys adjacent), and
// its element (d, h, j).
static ggml_tensor * new_cache(ggml_context * ctx, const problem & p, bool head_major) {
    if (!head_major) return ggml_new_tensor_3d(ctx, GGML_TYPE_F16, p.D, p.Hkv, p.n_kv);  // [D, Hkv, n_kv]
    ggml_tensor * heads = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, p.D, p.n_kv, p.Hkv);     // [D, n_kv, Hkv]
    return ggml_permute(ctx, heads, 0, 2, 1, 3);                                          // [D, Hkv, n_kv]
}

static bool timed_head_major() {
    const char * layout = std::getenv("XATTN_LAYOUT");
    return layout ? std::string(layout) == "head" : caches_head_major();
}

static ggml_fp16_t & element(ggml_tensor * t, int64_t i) {  // i = d + D (h + Hkv j)
    const int64_t d = i % t->ne[0], h = i / t->ne[0] % t->ne[1], j = i / (t->ne[0] * t->ne[1]);
    return *reinterpret_cast<ggml_fp16_t *>(static_cast<char *>(t->data) + d * t->nb[0] + h * t->nb[1] + j * t->nb[2]);
}

// The largest |out - ref| / bound over all outputs (out: [D * Hq, T] F32; q already scaled as the graph scales it).
static double worst_ratio(const problem & p, const ggml_tensor * out, const std::vector<float> & q,
                          const std::vector<float> & k, const std::vector<float> & v, bool tiles = false) {
    const double u = std::ldexp(1.0, -24);
    const double gamma_d = p.D * u / (1 - p.D * u), gamma_n = p.n_kv * u / (1 - p.n_kv * u);
    const int64_t G = p.Hq / p.Hkv, rescales = (p.n_kv + 63) / 64;
    double worst = 0;
    std::vector<double> s(static_cast<size_t>(p.n_kv));
    for (int64_t t = 0; t < p.T; ++t) {
        for (int64_t hq = 0; hq < p.Hq; ++hq) {
            const int64_t h = hq / G;
            const float * qr = q.data() + (t * p.Hq + hq) * p.D;
            double m = -std::numeric_limits<double>::infinity(), largest = 0, v_max = 0;
            for (int64_t j = 0; j < p.n_kv; ++j) {
                const float * kr = k.data() + (j * p.Hkv + h) * p.D;
                double dot = 0, abs_dot = 0;
                for (int64_t d = 0; d < p.D; ++d) dot += double(qr[d]) * kr[d], abs_dot += std::fabs(double(qr[d]) * kr[d]);
                s[j] = dot + mask_bias(t, j, p.T);
                m = std::max(m, s[j]);
                largest = std::max(largest, abs_dot);
                for (int64_t d = 0; d < p.D; ++d) v_max = std::max(v_max, double(std::fabs(v[(j * p.Hkv + h) * p.D + d])));
            }
            double sum = 0;
            for (int64_t j = 0; j < p.n_kv; ++j) sum += s[j] = std::isinf(m) ? 0.0 : std::exp(s[j] - m);
            const double bf16 = std::ldexp(1.0, -9);
            const double rel = tiles ? 2 * (gamma_d + 2 * bf16) * largest + 4 * u + 3e-6 + 2 * gamma_n + 2 * u * rescales + 2 * bf16
                                     : 2 * gamma_d * largest + 4 * u + 4e-7 + 2 * gamma_n + 2 * u * rescales;
            for (int64_t d = 0; d < p.D; ++d) {
                double o = 0, abs_o = 0;
                for (int64_t j = 0; j < p.n_kv; ++j) {
                    const double vj = v[(j * p.Hkv + h) * p.D + d];
                    o += s[j] * vj, abs_o += s[j] * std::fabs(vj);
                }
                const double ref = sum > 0 ? o / sum : 0.0;
                const double bound = sum > 0 ? 2 * (rel * abs_o + p.n_kv * u * v_max) / sum + 1e-30 : 1e-30;
                const double got = static_cast<const float *>(out->data)[t * p.D * p.Hq + hq * p.D + d];
                worst = std::max(worst, std::fabs(got - ref) / bound);
            }
        }
    }
    return worst;
}

// Runs fn with the AVX-512 BF16 family off (MLLAMA_AVX512=0: the AVX2 form) or as the environment has it.
template <class Fn>
static auto with_form(bool avx2, Fn fn) {
    const char * was = std::getenv("MLLAMA_AVX512");
    const std::string saved = was ? was : "";
    if (avx2) setenv("MLLAMA_AVX512", "0", 1);
    auto result = fn();
    if (!was) unsetenv("MLLAMA_AVX512");
    else setenv("MLLAMA_AVX512", saved.c_str(), 1);
    return result;
}

// The kernel's output for the family the environment selects (MLLAMA_AVX512), or null where it does not run.
static ggml_tensor * run(const problem & p, ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                         ggml_tensor * mask, int threads, bool tiles = false) {
    if (!cache_attention_supported(q, k, v, mask)) return nullptr;
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.D));
    ggml_tensor * out = cache_attention(ctx, q, k, v, mask, scale, tiles);  // [D * Hq, T]
    ggml_cgraph * graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, out);
    ggml_graph_compute_with_ctx(ctx, graph, threads);
    return out;
}

// `copies` caches of random F16 with our kernel's graph and ggml's flash attention (F32 precision, as the
// decoder calls it) on each.
struct timed_graphs {
    std::vector<ggml_cgraph *> ours, theirs, tiles;
};

static timed_graphs timing_graphs(const problem & p, ggml_context * ctx, ggml_tensor * q, ggml_tensor * mask, int copies) {
    timed_graphs g;
    for (int c = 0; c < copies; ++c) {
        ggml_tensor * k = new_cache(ctx, p, timed_head_major()), * v = new_cache(ctx, p, timed_head_major());
        for (int64_t i = 0; i < ggml_nelements(k); ++i) {
            element(k, i) = ggml_fp32_to_fp16(static_cast<float>((i * 7919) % 1999) / 1999.0f - 0.5f);
            element(v, i) = ggml_fp32_to_fp16(static_cast<float>((i * 104729) % 997) / 997.0f - 0.5f);
        }
        const float scale = 1.0f / std::sqrt(static_cast<float>(p.D));
        g.ours.push_back(ggml_new_graph(ctx));
        ggml_build_forward_expand(g.ours.back(), cache_attention(ctx, q, k, v, mask, scale, false));  // [D * Hq, T]
        g.tiles.push_back(ggml_new_graph(ctx));
        ggml_build_forward_expand(g.tiles.back(), cache_attention(ctx, q, k, v, mask, scale, true));  // [D * Hq, T]
        ggml_tensor * fa = ggml_flash_attn_ext(ctx, ggml_permute(ctx, q, 0, 2, 1, 3), ggml_permute(ctx, k, 0, 2, 1, 3),
                                               ggml_permute(ctx, v, 0, 2, 1, 3), mask, scale, 0.0f, 0.0f);  // [D, Hq, T]
        ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
        g.theirs.push_back(ggml_new_graph(ctx));
        ggml_build_forward_expand(g.theirs.back(), fa);
    }
    return g;
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        std::fprintf(stderr, "usage: %s D Hq Hkv T n_kv [threads]\n", argv[0]);
        return 2;
    }
    const problem p{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5])};
    const int threads = argc > 6 ? std::atoi(argv[6]) : 2, reps = argc > 7 ? std::atoi(argv[7]) : 0;
    if (!avx2_kernels_available()) {
        std::printf("skip: no AVX2 on this CPU\n");
        return 0;
    }
    const size_t cache_bytes = size_t(4) * p.D * p.Hkv * p.n_kv;  // K and V, F16
    const char * copies_env = std::getenv("XATTN_COPIES");  // 1: the cache stays in L2/L3, the arithmetic alone
    const int copies = reps <= 0 ? 0
                       : copies_env ? std::max(1, std::atoi(copies_env))
                                    : static_cast<int>((size_t(256) << 20) / cache_bytes + 1);
    const size_t bytes = size_t(8) * (p.D * p.Hq * p.T * 4 + 2 * p.D * p.Hkv * p.n_kv + p.n_kv * p.T) +
                         size_t(3) * copies * (cache_bytes + size_t(8) * p.D * p.Hq * p.T) + (size_t(16) << 20);
    ggml_context * ctx = ggml_init({bytes, nullptr, false});
    std::mt19937_64 rng(static_cast<uint64_t>(p.D * 1000003 + p.Hq * 31 + p.n_kv));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, p.D, p.Hq, p.T);     // [D, Hq, T]
    ggml_tensor * k[2] = {new_cache(ctx, p, false), new_cache(ctx, p, true)};      // [D, Hkv, n_kv] each
    ggml_tensor * v[2] = {new_cache(ctx, p, false), new_cache(ctx, p, true)};
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_kv, p.T);     // [n_kv, T]
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.D));
    std::vector<float> q_scaled(static_cast<size_t>(ggml_nelements(q))), kf(static_cast<size_t>(ggml_nelements(k[0])));
    std::vector<float> vf(kf.size());
    for (size_t i = 0; i < q_scaled.size(); ++i) {
        const float x = 2.0f * normal(rng);
        static_cast<float *>(q->data)[i] = x;
        q_scaled[i] = x * scale;  // as ggml_scale computes it in the graph
    }
    for (size_t i = 0; i < kf.size(); ++i) {
        element(k[0], i) = element(k[1], i) = ggml_fp32_to_fp16(normal(rng));
        element(v[0], i) = element(v[1], i) = ggml_fp32_to_fp16(normal(rng));
        kf[i] = ggml_fp16_to_fp32(element(k[0], i));
        vf[i] = ggml_fp16_to_fp32(element(v[0], i));
    }
    for (int64_t t = 0; t < p.T; ++t)
        for (int64_t j = 0; j < p.n_kv; ++j)
            static_cast<ggml_fp16_t *>(mask->data)[t * p.n_kv + j] = ggml_fp32_to_fp16(mask_bias(t, j, p.T));
    const bool avx512 = kernel_family() == cpu_family::avx512_bf16;
    if (!cache_attention_supported(q, k[0], v[0], mask)) {
        std::printf("unsupported shape\n");
        return 1;
    }
    auto worst = [&](bool tiles) {  // the larger ratio of the two layouts
        double ratio = 0.0;
        for (int layout = 0; layout < 2; ++layout) {
            const ggml_tensor * out = run(p, ctx, q, k[layout], v[layout], mask, threads, tiles);
            ratio = std::max(ratio, worst_ratio(p, out, q_scaled, kf, vf, tiles));
        }
        return ratio;
    };
    std::printf("avx2=%.4f ", with_form(true, [&] { return worst(false); }));
    if (avx512) std::printf("avx512=%.4f ", worst(false));
    else std::printf("avx512=none ");
    const bool amx = amx_tiles_available() && p.T >= k_xattn_tile_min_tokens && p.D % 32 == 0;
    if (amx) std::printf("amx=%.4f\n", worst(true));
    else std::printf("amx=none\n");
    if (reps > 0) {
        const timed_graphs timed = timing_graphs(p, ctx, q, mask, copies);
        const double ggml_ms = median_ms(ctx, timed.theirs, threads, reps);
        const double avx2_ms = with_form(true, [&] { return median_ms(ctx, timed.ours, threads, reps); });
        const double avx512_ms = avx512 ? median_ms(ctx, timed.ours, threads, reps) : 0.0;
        const double amx_ms = amx ? median_ms(ctx, timed.tiles, threads, reps) : 0.0;
        std::printf("ggml_ms=%.4f avx2_ms=%.4f avx512_ms=%.4f amx_ms=%.4f cache_bytes=%zu copies=%d layout=%s\n", ggml_ms,
                    avx2_ms, avx512_ms, amx_ms, cache_bytes, copies, timed_head_major() ? "head" : "key");
    }
    ggml_free(ctx);
    return 0;
}
