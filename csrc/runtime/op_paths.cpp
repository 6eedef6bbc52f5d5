#include "runtime/op_paths.h"

#include "graph/cross_kv.h"
#include "graph/vision.h"
#include "kernels/dispatch.h"
#include "model/devices.h"
#include "model/model.h"
#include "model/repack.h"
#include "runtime/backend.h"
#include "runtime/context.h"
#include "runtime/rpc.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>

#include <utility>
#include <vector>

namespace mllama {

// The SIMD features the loaded ggml CPU backend uses ("AVX2 F16C FMA", "NEON DOTPROD", ...).
static std::string cpu_simd() {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu_device());
    auto get_features = (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
    std::string out;
    for (ggml_backend_feature * f = get_features ? get_features(reg) : nullptr; f && f->name; ++f) {
        if (std::string(f->value) == "1") out += (out.empty() ? "" : " ") + std::string(f->name);
    }
    return out.empty() ? "generic" : out;
}

static std::string line(const char * family, const std::string & path) { return std::string(family) + ": " + path + "\n"; }

// "3 on CPU, 2 on RPC0 (host:port)": how many text layers each device holds, in model order.
static std::string text_devices(const mllama_model & m) {
    std::vector<std::pair<ggml_backend_dev_t, int>> counts;
    for (size_t il = 0; il + 1 < m.plan.layers.size(); ++il) {
        ggml_backend_dev_t dev = m.plan.layers[il];
        if (counts.empty() || counts.back().first != dev) counts.emplace_back(dev, 0);
        ++counts.back().second;
    }
    std::string out;
    for (const auto & [dev, n] : counts) {
        const std::string endpoint = rpc_endpoint(dev);
        out += (out.empty() ? "" : ", ") + std::to_string(n) + " on " + ggml_backend_dev_name(dev) +
               (endpoint.empty() ? "" : " (" + endpoint + ")");
    }
    return out;
}

// How many of the text matrices (the decoder's products and the output) are Q6_K.
static int q6k_text_matrices(const mllama_model & m) {
    auto in_file_layout = [&](const ggml_tensor * w) {
        return w && w->type == GGML_TYPE_Q6_K && !m.repacked.count(ggml_get_name(w));
    };
    int n = in_file_layout(m.text.output) ? 1 : 0;
    for (const text_layer_w & l : m.text.layers) {
        for (const ggml_tensor * w : {l.self.wq, l.self.wk, l.self.wv, l.self.wo, l.cross.wq, l.cross.wo, l.ffn.gate,
                                      l.ffn.up, l.ffn.down}) {
            n += in_file_layout(w) ? 1 : 0;
        }
    }
    return n;
}

static std::string on_tiles() {
    return amx_tiles_emulated() ? "(x86 AMX tiles, emulated: MLLAMA_AMX_EMULATE=1)" : "(x86 AMX tiles)";
}

// Our Q6_K kernel takes the products of the text layers on the CPU (every batch, in passes of up to
// k_qmm_max_rows rows), and on AMX tiles our Q6_K tile product prefill's from k_q6k_tiles_min_rows rows (where
// it cannot, the tile GEMM from k_q6k_decoded_min_rows, as prefill_path says), under the decoder's per-layer rule
// (cpu_kernels_allowed_on).
static std::string q6k_path(const mllama_context & c, const std::string & ggml_cpu) {
    const mllama_model & m = *c.model;
    const int n = q6k_text_matrices(m);
    if (n == 0) return "none in this model";
    int on_cpu = 0;
    for (ggml_backend_dev_t dev : m.plan.layers) on_cpu += cpu_kernels_allowed_on(m.plan, dev) ? 1 : 0;
    if (on_cpu == 0) return std::to_string(n) + ", " + ggml_cpu + ": mul_mat";
    std::string out = std::to_string(n) + ", ";
    if (c.kernels.may_run(cpu_kernel::qmm)) {
        const char * form = kernel_family() == cpu_family::avx2 ? "(x86 AVX2)" : "(x86 AVX512-VNNI)";
        out += std::string("mllama Q6_K kernel ") + form + " in passes of up to " + std::to_string(k_qmm_max_rows) +
               " rows";
    } else {
        out += ggml_cpu + ": mul_mat";
    }
    if (c.kernels.may_run(cpu_kernel::amx)) {
        out += "; prefill from " + std::to_string(k_q6k_tiles_min_rows) + " rows: mllama Q6_K kernel " + on_tiles();
    }
    return out;
}

// Prefill's products of the BF16 and quantized matrices in the file layout (graph/decoder.cpp's prefill_on_tiles).
static std::string prefill_path(const mllama_context & c) {
    if (!c.kernels.may_run(cpu_kernel::amx)) return "";
    std::string q6k;
    if (c.kernels.may_run(cpu_kernel::qmm)) {
        q6k = " (q6_K: those the Q6_K tile kernel cannot take, from " + std::to_string(k_q6k_decoded_min_rows) + ")";
    }
    return line("text matrices in the file layout, prefill", "from " + std::to_string(k_q4k_tiles_min_rows) + " rows" +
                q6k + ", up to " + std::to_string(k_prefill_decode_max_bytes >> 20) +
                " MiB as BF16: BF16, or quantized decoded to BF16, for mllama BF16 GEMM " + on_tiles());
}

// Our Q4_K kernel takes the decode-time products of the q4_K matrices ggml repacked (CPU_REPACK)
// (kernels/dispatch.h's q4k_matmul), and on AMX tiles those of prefill (q4k_matmul_tiles).
static std::string q4k_path(const mllama_context & c) {
    const bool vnni = c.kernels.may_run(cpu_kernel::qmm), tiles = c.kernels.may_run(cpu_kernel::amx);
    if (!vnni && !tiles) return "";
    int n = 0;
    for (const auto & [name, t] : c.model->tensors) {
        const bool repacked = t->type == GGML_TYPE_Q4_K && t->buffer && t->extra &&
                              std::strcmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer)), "CPU_REPACK") == 0;
        n += repacked ? 1 : 0;
    }
    if (n == 0) return "";
    std::string out = "; the " + std::to_string(n) + " repacked q4_K:";
    if (vnni) {
        const char * form = kernel_family() == cpu_family::avx2 ? "(x86 AVX2)" : "(x86 AVX512-VNNI)";
        out += std::string(" mllama Q4_K kernel ") + form + " in passes of up to " + std::to_string(q4k_max_rows()) +
               " rows";
    }
    if (tiles) {
        out += std::string(vnni ? "," : "") + " mllama Q4_K kernel " + on_tiles() + " from " +
               std::to_string(k_q4k_tiles_min_rows) + " rows";
    }
    return out;
}

// The groups of text matrices multiplied as one (model/placement.h's fuse_projections), where the context may.
static std::string fused_path(const mllama_context & c) {
    if (c.model->n_fused == 0 || !c.kernels.may_run(cpu_kernel::fuse)) return "";
    return "; q, k, v and gate, up as one product each where adjacent in the repacked buffer (" +
           std::to_string(c.model->n_fused) + " groups)";
}

// The kernel family's name for an op without AMX tiles ("(x86 AVX512-BF16)", "(x86 AVX2)").
static std::string family() { return kernel_family() == cpu_family::avx2 ? "(x86 AVX2)" : "(x86 AVX512-BF16)"; }
// A cache's layout where it is not ggml's usual key-major one (runtime/context.h).
static std::string cache_layout(bool head_major) { return head_major ? ", head-major" : ""; }
// The cross-attention's block step: AVX-512 (F32 FMAs, no BF16) in the AVX-512 BF16 family, else AVX2.
static std::string vector_form() { return kernel_family() == cpu_family::avx2 ? "(x86 AVX2)" : "(x86 AVX-512)"; }

static std::string vision_gemm(const vision_options & opt, const std::string & ggml_cpu) {
    if (!opt.bf16_gemm) return ggml_cpu + ": mul_mat";
    return "mllama BF16 GEMM, bias/GELU fused " + (opt.amx_gemm ? on_tiles() : family());
}

static std::string vision_attention(const vision_options & opt, const std::string & ggml_cpu) {
    if (!opt.bf16_attention) return ggml_cpu + ": flash_attn_ext";
    return "mllama BF16 flash attention " + (opt.amx_attention ? on_tiles() : family());
}

// Prefill's cross-attention on AMX tiles (kernels/dispatch.h's cache_attention), where the context may and the
// head size allows.
static std::string xattn_tiles(const mllama_context & c) {
    if (!c.kernels.may_run(cpu_kernel::amx) || !amx_tiles_available() || c.model->hp.text.n_embd_head % 32 != 0) return "";
    return ", from " + std::to_string(k_xattn_tile_min_tokens) + " tokens " + on_tiles();
}

// The K and V projections of an image's tokens for the cross-attention layers.
static std::string image_cross_kv(const mllama_model & m, const vision_options & opt, const std::string & ggml_cpu) {
    int total = 0;
    for (const text_layer_w & l : m.text.layers) total += l.is_cross ? 2 : 0;
    const int n = cross_kv_products_on_gemm(m, opt);
    if (n == 0) return ggml_cpu + ": mul_mat";
    const std::string rest = n < total ? ", " + std::to_string(total - n) + " of " + std::to_string(total) + " " +
                                             ggml_cpu + ": mul_mat"
                                       : "";
    return "mllama BF16 GEMM on the weights decoded to BF16 " + (opt.amx_gemm ? on_tiles() : family()) + rest;
}

static bool all_text_on_cpu(const mllama_model & m) {
    for (ggml_backend_dev_t dev : m.plan.layers) {
        if (!is_cpu(dev)) return false;
    }
    return true;
}

std::string op_paths(const mllama_context & c) {
    const mllama_model & m = *c.model;
    const std::string ggml_cpu = "ggml CPU ops (" + cpu_simd() + ")";
    if (!is_cpu(m.plan.vision)) {
        const std::string dev = ggml_backend_dev_name(m.plan.vision);
        return line("device", dev + " (mllama's CPU kernels are never used on it)") +
               line("vision encoder, projector", "ggml on " + dev) +
               line("text layers", text_devices(m) + "; on the CPU: " + ggml_cpu) +
               line("ops the device lacks", ggml_cpu + " (the scheduler's fallback)");
    }
    const std::string others = all_text_on_cpu(m) ? "" : line("text layers", text_devices(m) + " (ggml there)");
    const vision_options opt = vision_options_for(m, c.kernels);
    const bool xattn = c.kernels.may_run(cpu_kernel::xattn) && !c.state.cross_k.empty() &&
                       c.state.cross_k[0]->type == GGML_TYPE_F16;
    const auto self_cache = std::find_if(c.state.self_k.begin(), c.state.self_k.end(), [](auto * t) { return t; });
    const bool self_xattn = c.kernels.may_run(cpu_kernel::xattn) && self_cache != c.state.self_k.end() &&
                            (*self_cache)->type == GGML_TYPE_F16;
    const std::string repacked = repack_summary(m.tensors, m.repacked);
    return line("device", "CPU, " + ggml_cpu) +
           line("vision attention", vision_attention(opt, ggml_cpu)) +
           line("vision linear layers", vision_gemm(opt, ggml_cpu)) +
           line("image cross-attention K/V", image_cross_kv(m, opt, ggml_cpu)) +
           line("vision GELU", opt.fast_gelu ? "mllama vectorized GELU " + family() : ggml_cpu + ": gelu_erf") +
           line("cross-attention", xattn ? "mllama GQA kernel over the F16 image cache" +
                                                cache_layout(c.state.cross_head_major) + " " + vector_form() +
                                                xattn_tiles(c)
                                         : ggml_cpu + ": flash_attn_ext") +
           line("self-attention", self_xattn ? "mllama GQA kernel over the F16 caches" +
                                                   cache_layout(c.state.self_head_major) + " " + vector_form()
                                             : ggml_cpu + ": flash_attn_ext") +
           line("text matrices", ggml_cpu + ": mul_mat; in ggml's extra CPU layouts: " +
                                    (repacked.empty() ? "none" : repacked) + q4k_path(c) + fused_path(c)) +
           line("text matrices q6_K in the file layout", q6k_path(c, ggml_cpu)) + prefill_path(c) + others;
}

}  // namespace mllama
