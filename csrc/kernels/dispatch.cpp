// Which of our CPU kernels (cpu_kernels.h) may run: the CPU's features and MLLAMA_CPU_KERNELS.
#include "kernels/dispatch.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace mllama {

bool cpu_kernels_available() {
    static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("avx512bf16");
    return ok;
}

bool cpu_kernel_enabled(const char * name) {
    if (!cpu_kernels_available()) return false;
    const char * env = std::getenv("MLLAMA_CPU_KERNELS");
    if (!env || std::strcmp(env, "1") == 0) return true;
    const std::string list = std::string(",") + env + ",";
    return list.find(std::string(",") + name + ",") != std::string::npos;
}

}  // namespace mllama
