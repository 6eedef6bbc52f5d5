// Advice to the kernel about the pages of host memory: huge pages for compute buffers, mapping the
// pages of file-mapped weights in ahead of use, releasing pages copied elsewhere. Advice only: a
// kernel without the feature leaves the pages as they are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

struct ggml_backend_buffer;
struct ggml_cgraph;

namespace mllama {

// Asks the kernel for transparent huge pages on a host buffer not yet touched, or on the buffers
// the graph's nodes live in (the compute buffer), so that they fault in 2 MiB instead of 4 KiB
// steps. A no-op where THP is off or for device memory.
void advise_huge_pages(ggml_backend_buffer * buf);
void advise_huge_pages(ggml_cgraph * graph);

// Maps the pages of read-only file mappings [begin, begin + size) into the process now, split
// across n_threads (MADV_POPULATE_READ, like llama.cpp's MAP_POPULATE), so that a graph's first run
// does not take the page faults one at a time (figures in bench/README.md). A kernel without it
// (before Linux 5.14) leaves the pages to fault in on first use.
void populate_pages(std::vector<std::pair<const uint8_t *, size_t>> ranges, int n_threads);

// Releases the whole pages of [data, data + n) from this process (the page cache keeps them).
void drop_pages(const uint8_t * data, size_t n);

}  // namespace mllama
