#include "runtime/backend.h"

#include "kernels/dispatch.h"
#include "common/error.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace mllama {

int device_count() { return static_cast<int>(ggml_backend_dev_count()); }

ggml_backend_dev_t device_at(int index) {
    if (index < 0 || index >= device_count()) fail(MLLAMA_ERR_INVALID_ARGUMENT, "device index %d out of range (%d devices)", index, device_count());
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

ggml_backend_dev_t select_device(const char * request) {
    const std::string want = request ? request : "";
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
    fail(MLLAMA_ERR_INVALID_ARGUMENT, "unknown device '%s' (available: %s)", want.c_str(), names.c_str());
}

int physical_core_count() {
    std::ifstream cpuinfo("/proc/cpuinfo");
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

void advise_huge_pages(ggml_backend_buffer_t buf) {
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t k_huge = uintptr_t(1) << 21;
    if (!buf || !ggml_backend_buffer_is_host(buf)) return;
    const auto base = reinterpret_cast<uintptr_t>(ggml_backend_buffer_get_base(buf));
    const uintptr_t begin = (base + k_huge - 1) & ~(k_huge - 1), end = (base + ggml_backend_buffer_get_size(buf)) & ~(k_huge - 1);
    if (end > begin) madvise(reinterpret_cast<void *>(begin), end - begin, MADV_HUGEPAGE);  // advice only: errors change nothing
#else
    (void) buf;
#endif
}

void advise_huge_pages(ggml_cgraph * graph) {
    std::vector<ggml_backend_buffer_t> seen;
    for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) {
        ggml_backend_buffer_t buf = ggml_graph_node(graph, i)->buffer;
        if (!buf || std::find(seen.begin(), seen.end(), buf) != seen.end()) continue;
        seen.push_back(buf);
        advise_huge_pages(buf);
    }
}

void populate_pages(std::vector<std::pair<const uint8_t *, size_t>> ranges, int n_threads) {
#ifndef MADV_POPULATE_READ
    constexpr int MADV_POPULATE_READ = 22;  // Linux 5.14 (older headers lack the name)
#endif
    constexpr uintptr_t k_chunk = uintptr_t(64) << 20;  // bytes per work item
    const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // page-aligned [begin, end), merged
    std::sort(ranges.begin(), ranges.end());
    for (const auto & [data, n] : ranges) {
        const auto begin = reinterpret_cast<uintptr_t>(data) / page * page;
        const auto end = (reinterpret_cast<uintptr_t>(data) + n + page - 1) / page * page;
        if (!spans.empty() && begin <= spans.back().second) spans.back().second = std::max(spans.back().second, end);
        else if (end > begin) spans.emplace_back(begin, end);
    }
    std::vector<std::pair<uintptr_t, uintptr_t>> items;
    for (const auto & [begin, end] : spans)
        for (uintptr_t at = begin; at < end; at += k_chunk) items.emplace_back(at, std::min(end, at + k_chunk));
    std::atomic<size_t> next{0};
    auto work = [&] {
        for (size_t i = next++; i < items.size(); i = next++)
            madvise(reinterpret_cast<void *>(items[i].first), items[i].second - items[i].first, MADV_POPULATE_READ);
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < std::min<int>(n_threads, static_cast<int>(items.size())); ++i) pool.emplace_back(work);
    work();
    for (std::thread & t : pool) t.join();
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
    // our own CPU kernels (cpu_kernels.h), independent of how ggml was built
    return out + " | mllama: AVX512_BF16_KERNELS=" + (cpu_kernels_available() ? "1" : "0");
}

}  // namespace mllama
