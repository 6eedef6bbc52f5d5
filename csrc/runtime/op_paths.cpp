#include "runtime/op_paths.h"

#include "graph/vision.h"
#include "kernels/dispatch.h"
#include "model/model.h"
#include "runtime/backend.h"
#include "runtime/context.h"

#include "ggml-backend.h"
#include "ggml.h"

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

std::string op_paths(const mllama_context & c) {
    const mllama_model & m = *c.model;
    const std::string ggml_cpu = "ggml CPU ops (" + cpu_simd() + ")";
    if (!is_cpu(m.compute_device)) {
        const std::string dev = ggml_backend_dev_name(m.compute_device);
        return line("device", dev + " (mllama's CPU kernels are never used on it)") +
               line("vision encoder, projector, cross K/V", "ggml on " + dev) +
               line("text layers", std::to_string(m.info.n_gpu_layers) + " of " + std::to_string(m.hp.text.n_layer) +
                                       " on " + dev + ", the rest " + ggml_cpu) +
               line("ops the device lacks", ggml_cpu + " (the scheduler's fallback)");
    }
    const vision_options opt = vision_options_for(m, c.kernels);
    const bool xattn = c.kernels.may_run(cpu_kernel::xattn) && !c.state.cross_k.empty() &&
                       c.state.cross_k[0]->type == GGML_TYPE_F16;
    const std::string repacked = std::to_string(m.repacked.size());
    return line("device", "CPU, " + ggml_cpu) +
           line("vision attention", opt.bf16_attention ? "mllama BF16 flash attention (x86 AVX512-BF16)"
                                                       : ggml_cpu + ": flash_attn_ext") +
           line("vision linear layers", opt.bf16_gemm ? "mllama BF16 GEMM, bias/GELU fused (x86 AVX512-BF16)"
                                                      : ggml_cpu + ": mul_mat") +
           line("vision GELU", opt.fast_gelu ? "mllama vectorized GELU (x86 AVX-512)" : ggml_cpu + ": gelu_erf") +
           line("decode cross-attention", xattn ? "mllama GQA kernel over the F16 image cache (x86 AVX-512)"
                                                : ggml_cpu + ": flash_attn_ext") +
           line("self-attention, prefill cross-attention", ggml_cpu + ": flash_attn_ext") +
           line("text matrices", ggml_cpu + ": mul_mat, " + repacked + " in ggml's repacked CPU layout");
}

}  // namespace mllama
