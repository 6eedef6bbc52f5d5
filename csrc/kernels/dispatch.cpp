// Which of our CPU kernels (kernels/dispatch.h) may run: the CPU's features and the context's choice.
#include "kernels/dispatch.h"

#include "common/error.h"
#include "common/text.h"

#include <cstring>
#include <string>

namespace mllama {

#if MLLAMA_X86_KERNELS
bool cpu_kernels_available() {
    static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("avx512bf16");
    return ok;
}

bool cpu_kernel_available(cpu_kernel k) {
    static const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return k == cpu_kernel::qmm ? vnni : cpu_kernels_available();
}
#else
bool cpu_kernels_available() { return false; }
bool cpu_kernel_available(cpu_kernel) { return false; }

// The kernels' entry points, for the graphs to link on other processors: never reached, since no
// kernel may run where cpu_kernels_available() is false.
[[noreturn]] static void no_x86_kernels() {
    fail(MLLAMA_ERR_INTERNAL, "an x86 kernel was asked for in a build without them");
}
ggml_tensor * bf16_attention(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *) {
    no_x86_kernels();
}
ggml_tensor * bf16_attention_mask_rows(ggml_context *, ggml_tensor *) { no_x86_kernels(); }
bool bf16_linear_supported(const ggml_tensor *) { return false; }
ggml_tensor * bf16_linear(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, bool, bool) { no_x86_kernels(); }
bool decode_attention_supported(const ggml_tensor *, const ggml_tensor *, const ggml_tensor *, const ggml_tensor *) {
    return false;
}
ggml_tensor * decode_attention(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *, float) {
    no_x86_kernels();
}
ggml_tensor * gelu_erf_avx512(ggml_context *, ggml_tensor *) { no_x86_kernels(); }
bool q6k_matmul_supported(const ggml_tensor *, const ggml_tensor *) { return false; }
ggml_tensor * q6k_matmul(ggml_context *, ggml_tensor *, ggml_tensor *) { no_x86_kernels(); }
#endif

static constexpr struct {
    const char * name;
    cpu_kernel kernel;
} k_kernel_names[] = {
    {"attn", cpu_kernel::attn}, {"gemm", cpu_kernel::gemm}, {"gelu", cpu_kernel::gelu}, {"xattn", cpu_kernel::xattn},
    {"qmm", cpu_kernel::qmm}};

cpu_kernel_set kernels_for_compute(cpu_kernel_set allowed, bool compute_on_cpu) {
    return compute_on_cpu ? allowed : cpu_kernel_set{};
}

const char * cpu_kernel_name(cpu_kernel kernel) {
    for (const auto & k : k_kernel_names) {
        if (k.kernel == kernel) return k.name;
    }
    return "?";
}

cpu_kernel_set parse_cpu_kernels(const char * spec) {
    cpu_kernel_set set;
    if (!spec || !*spec || std::strcmp(spec, "1") == 0) {
        for (const auto & k : k_kernel_names) set.bits |= static_cast<uint32_t>(k.kernel);
        return set;
    }
    if (std::strcmp(spec, "0") == 0) return set;
    for (const std::string & entry : split_list(spec)) {
        bool known = false;
        for (const auto & k : k_kernel_names) {
            if (entry == k.name) set.bits |= static_cast<uint32_t>(k.kernel), known = true;
        }
        if (!known) {
            std::string valid;
            for (const auto & k : k_kernel_names) valid += (valid.empty() ? "" : ", ") + std::string(k.name);
            fail(MLLAMA_ERR_INVALID_ARGUMENT,
                 "unknown CPU kernel '%s' in cpu_kernels '%s' (valid: %s; \"1\" all, \"0\" none)", entry.c_str(),
                 spec, valid.c_str());
        }
    }
    return set;
}

}  // namespace mllama
