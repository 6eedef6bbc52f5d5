// Which device holds what: the device list the text layers are split over (local GPUs, ggml RPC
// workers, the CPU), the split itself, the vision device, and the report of where everything went
// and why (mllama_model_get_placement).
#pragma once

#include "mllama.h"

#include <memory>
#include <string>
#include <vector>

struct ggml_backend_device;
typedef struct ggml_backend_device * ggml_backend_dev_t;
struct ggml_backend_buffer;

namespace mllama {

// Device index per text layer: -1 for the CPU (layers not offloaded), else an index into the
// device list. The last n_offload layers (< 0: all) are offloaded, in order, in proportion to
// `proportions` (one weight >= 0 per device, not all zero), like llama.cpp's tensor_split.
std::vector<int> split_layers(int n_layer, int n_offload, const std::vector<float> & proportions);

// The resolved placement of a model's components.
struct device_plan {
    ggml_backend_dev_t vision = nullptr;            // vision tower + projector
    std::vector<ggml_backend_dev_t> layers;         // per text layer, then the output (n_layer + 1)
    std::vector<ggml_backend_dev_t> devices;        // the text device list, in order (may hold the CPU)
    std::vector<float> proportions;                 // the split used, one per device
    std::vector<std::string> endpoints;             // RPC workers in use
    std::string split_reason;                       // "tensor_split 1, 1" or "free memory: ..."
    std::string vision_reason;
    int n_offload = 0;                              // text layers on the device list
    int rpc_io_timeout_s = 0;                       // every call on an RPC worker's connections: at most this
    // A 1-byte buffer on each worker from its connect to the end of the load: ggml keeps a worker's connection
    // only while a buffer holds it (one per endpoint, shared), so the planning's calls reuse one that is bounded.
    std::vector<std::shared_ptr<ggml_backend_buffer>> rpc_anchors;
};

// Bounds the calls on every connection to the plan's RPC workers open now (set_io_timeouts): called once
// connected (its anchor allocated), and again after each allocation on a worker.
void bound_rpc_calls(const device_plan & plan);

// The devices the plan uses other than the CPU, each once: the vision device's, then the text
// layers' in order (one backend and one weight context each).
std::vector<ggml_backend_dev_t> devices_in_use(const device_plan & plan);

// Our CPU kernels (ggml custom ops) may run on a component placed on the CPU: true when that
// device is the CPU and no local GPU is in the plan (a GPU backend may take CPU-side ops over,
// which it cannot do with a custom op; RPC devices never do).
bool cpu_kernels_allowed_on(const device_plan & plan, ggml_backend_dev_t dev);

// Connects the RPC workers of params.rpc_servers, resolves the device lists and splits the text
// layers (n_layer of them). Fails with MLLAMA_ERR_INVALID_ARGUMENT on unknown names or a bad split.
device_plan plan_devices(const mllama_model_params & params, int n_layer);

}  // namespace mllama
