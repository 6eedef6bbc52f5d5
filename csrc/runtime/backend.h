// Devices and threads, reached only through ggml's backend/device registry, so a ggml rebuilt with
// CUDA (or for the native CPU) is picked up without rebuilding mllama.
#pragma once

#include "mllama.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct ggml_backend_device;
struct ggml_cgraph;
struct ggml_backend_buffer;
typedef struct ggml_backend_device * ggml_backend_dev_t;

namespace mllama {

int device_count();
ggml_backend_dev_t device_at(int index);
mllama_device_info device_info(ggml_backend_dev_t dev);
ggml_backend_dev_t cpu_device();
// "auto"/""/nullptr: the first GPU (or integrated GPU), else the CPU; "cpu"; or an exact device name.
ggml_backend_dev_t select_device(const char * request);
bool is_cpu(ggml_backend_dev_t dev);

int physical_core_count();

// Asks the kernel for transparent huge pages on a host buffer not yet touched, or on the buffers
// the graph's nodes live in (the compute buffer: 0.56 GB for an 11B image graph), so that they
// fault in 2 MiB instead of 4 KiB steps. A no-op where THP is off or for device memory.
void advise_huge_pages(ggml_backend_buffer * buf);
void advise_huge_pages(ggml_cgraph * graph);
// Maps the pages of read-only file mappings [begin, end) into the process now, split across
// n_threads (MADV_POPULATE_READ, like llama.cpp's MAP_POPULATE): a page-cache-warm 11B vision tower
// otherwise pays ~2 s of page faults inside the first image. Advice only: a kernel without it
// (before Linux 5.14) leaves the pages to fault in on first use.
void populate_pages(std::vector<std::pair<const uint8_t *, size_t>> ranges, int n_threads);
// Features of the loaded CPU backend ("AVX2 = 1 | F16C = 1 | ...") and the devices.
std::string system_info();

}  // namespace mllama
