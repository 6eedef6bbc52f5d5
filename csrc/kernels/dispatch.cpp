// Which of our CPU kernels (kernels/dispatch.h) may run: the CPU's features and the context's choice.
#include "kernels/dispatch.h"

#include "common/error.h"

#include <cstring>
#include <string>

namespace mllama {

bool cpu_kernels_available() {
    static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("avx512bf16");
    return ok;
}

static constexpr struct {
    const char * name;
    cpu_kernel kernel;
} k_kernel_names[] = {
    {"attn", cpu_kernel::attn}, {"gemm", cpu_kernel::gemm}, {"gelu", cpu_kernel::gelu}, {"xattn", cpu_kernel::xattn}};

cpu_kernel_set parse_cpu_kernels(const char * spec) {
    cpu_kernel_set set;
    if (!spec || !*spec || std::strcmp(spec, "1") == 0) {
        for (const auto & k : k_kernel_names) set.bits |= static_cast<uint32_t>(k.kernel);
        return set;
    }
    if (std::strcmp(spec, "0") == 0) return set;
    const std::string list = spec;
    for (size_t begin = 0; begin <= list.size();) {
        size_t end = list.find(',', begin);
        if (end == std::string::npos) end = list.size();
        const std::string entry = list.substr(begin, end - begin);
        begin = end + 1;
        if (entry.empty()) continue;
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
