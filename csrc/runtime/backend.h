// Devices and threads, reached only through ggml's backend/device registry, so a ggml rebuilt with
// CUDA (or for the native CPU) is picked up without rebuilding mllama.
#pragma once

#include "mllama.h"

#include <cstdint>
#include <string>
#include <vector>

struct ggml_backend;
struct ggml_backend_device;
typedef struct ggml_backend_device * ggml_backend_dev_t;

namespace mllama {

int device_count();
ggml_backend_dev_t device_at(int index);
mllama_device_info device_info(ggml_backend_dev_t dev);
ggml_backend_dev_t cpu_device();
// "auto"/""/nullptr: the first GPU (or integrated GPU), else the CPU; "cpu"; or an exact device name, of the
// registry or of `extra` (RPC workers' devices, by name or by their endpoint, ggml-rpc's description of them).
ggml_backend_dev_t select_device(const char * request, const std::vector<ggml_backend_dev_t> & extra = {});
bool is_cpu(ggml_backend_dev_t dev);

int physical_core_count();

// Sets the number of threads of a backend that has them (the CPU backend).
void set_backend_threads(ggml_backend * backend, int n_threads);

// Features of the loaded CPU backend ("AVX2 = 1 | F16C = 1 | ...") and the devices.
std::string system_info();

}  // namespace mllama
