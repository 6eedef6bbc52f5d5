#include "runtime/pages.h"

#include "common/parallel.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

namespace mllama {

void advise_huge_pages(ggml_backend_buffer_t buf) {
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t k_huge = uintptr_t(1) << 21;
    if (!buf || !ggml_backend_buffer_is_host(buf)) return;
    const auto base = reinterpret_cast<uintptr_t>(ggml_backend_buffer_get_base(buf));
    const uintptr_t begin = (base + k_huge - 1) & ~(k_huge - 1);
    const uintptr_t end = (base + ggml_backend_buffer_get_size(buf)) & ~(k_huge - 1);
    if (end > begin) madvise(reinterpret_cast<void *>(begin), end - begin, MADV_HUGEPAGE);  // errors change nothing
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
#if defined(__linux__)
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
    parallel_for(items.size(), n_threads, [&](size_t i) {
        madvise(reinterpret_cast<void *>(items[i].first), items[i].second - items[i].first, MADV_POPULATE_READ);
    });
#else
    (void) ranges;  // elsewhere (macOS) the pages fault in on first use
    (void) n_threads;
#endif
}

void drop_pages(const uint8_t * data, size_t n) {
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + n) / page * page;
    if (end > begin) madvise(reinterpret_cast<void *>(begin), end - begin, MADV_DONTNEED);
}

}  // namespace mllama
