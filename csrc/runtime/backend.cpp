#include "runtime/backend.h"

#include "kernels/dispatch.h"
#include "common/error.h"
#include "ggml-backend.h"
#include "ggml.h"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#include <cstdio>
#include <fstream>
#include <set>
#include <thread>
#include <utility>

namespace mllama {

int device_count() { return static_cast<int>(ggml_backend_dev_count()); }

ggml_backend_dev_t device_at(int index) {
    if (index < 0 || index >= device_count()) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "device index %d out of range (%d devices)", index, device_count());
    }
    return ggml_backend_dev_get(static_cast<size_t>(index));
}

static void copy_str(char * dst, size_t cap, const char * src) {
    std::snprintf(dst, cap, "%s", src ? src : "");
}

mllama_device_info device_info(ggml_backend_dev_t dev) {
    mllama_device_info info{};
    copy_str(info.name, sizeof(info.name), ggml_backend_dev_name(dev));
    copy_str(info.description, sizeof(info.description), ggml_backend_dev_description(dev));
    switch (ggml_backend_dev_type(dev)) {
        case GGML_BACKEND_DEVICE_TYPE_GPU: info.type = MLLAMA_DEVICE_GPU; break;
        case GGML_BACKEND_DEVICE_TYPE_IGPU: info.type = MLLAMA_DEVICE_IGPU; break;
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: info.type = MLLAMA_DEVICE_ACCEL; break;
        default: info.type = MLLAMA_DEVICE_CPU; break;
    }
    size_t free_mem = 0, total_mem = 0;
    ggml_backend_dev_memory(dev, &free_mem, &total_mem);
    info.memory_free = free_mem;
    info.memory_total = total_mem;
    return info;
}

ggml_backend_dev_t cpu_device() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) fail(MLLAMA_ERR_BACKEND, "the loaded ggml has no CPU backend");
    return dev;
}

bool is_cpu(ggml_backend_dev_t dev) { return ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU; }

ggml_backend_dev_t select_device(const char * request, const std::vector<ggml_backend_dev_t> & extra) {
    const std::string want = request ? request : "";
    std::string listed;  // `extra` (devices outside the registry: RPC workers'), by name or description
    for (ggml_backend_dev_t dev : extra) {
        if (want == ggml_backend_dev_name(dev) || want == ggml_backend_dev_description(dev)) return dev;
        listed += ", " + std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev) + ")";
    }
    if (want.empty() || want == "auto") {
        if (ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU)) return gpu;
        if (ggml_backend_dev_t igpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU)) return igpu;
        return cpu_device();
    }
    if (want == "cpu" || want == "CPU") return cpu_device();
    std::string names;
    for (int i = 0; i < device_count(); ++i) {
        ggml_backend_dev_t dev = device_at(i);
        if (want == ggml_backend_dev_name(dev)) return dev;
        names += (names.empty() ? "" : ", ") + std::string(ggml_backend_dev_name(dev));
    }
    fail(MLLAMA_ERR_INVALID_ARGUMENT, "unknown device '%s' (available: %s%s)", want.c_str(), names.c_str(),
         listed.c_str());
}

int physical_core_count() {
#if defined(__APPLE__)
    int n_physical = 0;  // the performance and efficiency cores together
    size_t size = sizeof(n_physical);
    if (sysctlbyname("hw.physicalcpu", &n_physical, &size, nullptr, 0) == 0 && n_physical > 0) return n_physical;
#endif
    std::ifstream cpuinfo("/proc/cpuinfo");  // Linux; absent elsewhere (then the logical count below)
    std::set<std::pair<std::string, std::string>> cores;
    std::string line, physical_id = "0";
    while (std::getline(cpuinfo, line)) {
        if (line.rfind("physical id", 0) == 0) physical_id = line.substr(line.find(':') + 1);
        if (line.rfind("core id", 0) == 0) cores.emplace(physical_id, line.substr(line.find(':') + 1));
    }
    if (!cores.empty()) return static_cast<int>(cores.size());
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}

void set_backend_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto fn = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads")
                  : nullptr;
    if (fn) fn(backend, n_threads);
}

std::string system_info() {
    std::string out;
    for (size_t r = 0; r < ggml_backend_reg_count(); ++r) {
        ggml_backend_reg_t reg = ggml_backend_reg_get(r);
        out += std::string(out.empty() ? "" : " | ") + ggml_backend_reg_name(reg) + ":";
        auto get_features = (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
        if (!get_features) continue;
        for (ggml_backend_feature * f = get_features(reg); f && f->name; ++f) {
            out += std::string(" ") + f->name + "=" + f->value;
        }
    }
    // our own CPU kernels (kernels/dispatch.h), independent of how ggml was built: compiled in (x86-64
    // builds), and usable on this CPU
    return out + " | mllama: X86_KERNELS=" + (MLLAMA_X86_KERNELS ? "1" : "0") +
           " AVX2_KERNELS=" + (avx2_kernels_available() ? "1" : "0") +
           " AVX512_BF16_KERNELS=" + (cpu_kernels_available() ? "1" : "0") +
           " AVX512_VNNI_KERNELS=" + (cpu_kernels_available() && cpu_kernel_available(cpu_kernel::qmm) ? "1" : "0") +
           " AMX_TILE_KERNELS=" + (amx_tiles_hardware() ? "1" : "0");
}

}  // namespace mllama
