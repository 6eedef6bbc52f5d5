#include "model/devices.h"

#include "common/error.h"
#include "common/text.h"
#include "runtime/backend.h"
#include "runtime/rpc.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

namespace mllama {

std::vector<int> split_layers(int n_layer, int n_offload, const std::vector<float> & proportions) {
    if (n_layer < 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "n_layer %d < 0", n_layer);
    double total = 0.0;
    for (float p : proportions) {
        if (!std::isfinite(p) || p < 0.0f) fail(MLLAMA_ERR_INVALID_ARGUMENT, "tensor_split values must be >= 0");
        total += p;
    }
    const int n_dev = static_cast<int>(proportions.size());
    if (n_offload < 0 || n_offload > n_layer) n_offload = n_layer;
    if (n_offload > 0 && (n_dev == 0 || total <= 0.0)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "tensor_split must give a device a share (%d values, sum %g)", n_dev, total);
    }
    std::vector<double> cumulative(static_cast<size_t>(n_dev));
    double sum = 0.0;
    for (int d = 0; d < n_dev; ++d) cumulative[d] = (sum += proportions[d]) / total;
    std::vector<int> out(static_cast<size_t>(n_layer), -1);
    const int first = n_layer - n_offload;
    for (int il = first; il < n_layer; ++il) {
        const double at = static_cast<double>(il - first) / n_offload;  // where the layer starts in [0, 1)
        const auto it = std::upper_bound(cumulative.begin(), cumulative.end(), at);
        out[il] = std::min(static_cast<int>(it - cumulative.begin()), n_dev - 1);
    }
    return out;
}

static bool is_gpu(ggml_backend_dev_t dev, enum ggml_backend_dev_type type) {
    return ggml_backend_dev_type(dev) == type;
}

// The GPUs the text layers go to when no device list is given: the one named by `device` (chosen: the
// vision tower's, a local GPU or an RPC worker's), else every local one.
static std::vector<ggml_backend_dev_t> named_or_local_gpus(const std::string & device, ggml_backend_dev_t chosen) {
    std::vector<ggml_backend_dev_t> out;
    if (device == "cpu" || device == "CPU") return out;
    if (!device.empty() && device != "auto") {
        if (!is_cpu(chosen)) out.push_back(chosen);
        return out;
    }
    for (auto type : {GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU}) {  // integrated ones if no other
        for (int i = 0; i < device_count(); ++i) {
            if (is_gpu(device_at(i), type)) out.push_back(device_at(i));
        }
        if (!out.empty()) break;
    }
    return out;
}

static std::string describe_split(const std::vector<float> & proportions, bool given) {
    std::string s = given ? "tensor_split" : "free memory (GiB)";
    for (size_t i = 0; i < proportions.size(); ++i) {
        char buf[32];
        std::snprintf(buf, sizeof(buf), given ? "%s%g" : "%s%.1f", i ? ", " : " ",
                      given ? proportions[i] : proportions[i] / 1073741824.0);
        s += buf;
    }
    return s;
}

static void choose_split(device_plan & plan, const mllama_model_params & params) {
    const size_t n_dev = plan.devices.size();
    if (params.tensor_split && params.n_tensor_split > 0) {
        if (static_cast<size_t>(params.n_tensor_split) != n_dev) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "tensor_split has %d values for %zu devices", params.n_tensor_split,
                 n_dev);
        }
        plan.proportions.assign(params.tensor_split, params.tensor_split + n_dev);
        plan.split_reason = describe_split(plan.proportions, true);
        return;
    }
    for (ggml_backend_dev_t dev : plan.devices) {
        size_t free_mem = 0, total_mem = 0;
        ggml_backend_dev_memory(dev, &free_mem, &total_mem);
        plan.proportions.push_back(static_cast<float>(free_mem));
    }
    if (std::accumulate(plan.proportions.begin(), plan.proportions.end(), 0.0) <= 0.0) {
        plan.proportions.assign(n_dev, 1.0f);  // no device reports its memory: an even split
    }
    plan.split_reason = describe_split(plan.proportions, false);
}

static void choose_vision(device_plan & plan, const mllama_model_params & params,
                          const std::vector<ggml_backend_dev_t> & rpc_devices) {
    const std::string want = params.device ? params.device : "";
    if (!want.empty() && want != "auto") {
        plan.vision = select_device(want.c_str(), rpc_devices);
        plan.vision_reason = "device=\"" + want + "\"";
        return;
    }
    const std::vector<ggml_backend_dev_t> gpus = named_or_local_gpus("", nullptr);
    plan.vision = gpus.empty() ? cpu_device() : gpus[0];
    plan.vision_reason = gpus.empty() ? "auto: no local GPU" : "auto: the first local GPU";
}

std::vector<ggml_backend_dev_t> devices_in_use(const device_plan & plan) {
    std::vector<ggml_backend_dev_t> out;
    std::vector<ggml_backend_dev_t> used{plan.vision};
    used.insert(used.end(), plan.layers.begin(), plan.layers.end());
    for (ggml_backend_dev_t dev : used) {
        if (!is_cpu(dev) && std::find(out.begin(), out.end(), dev) == out.end()) out.push_back(dev);
    }
    return out;
}

bool cpu_kernels_allowed_on(const device_plan & plan, ggml_backend_dev_t dev) {
    const std::vector<ggml_backend_dev_t> others = devices_in_use(plan);
    auto is_rpc = [](ggml_backend_dev_t d) { return !rpc_endpoint(d).empty(); };
    return is_cpu(dev) && std::all_of(others.begin(), others.end(), is_rpc);
}

void bound_rpc_calls(const device_plan & plan) {
    if (!plan.endpoints.empty()) set_io_timeouts(plan.endpoints, plan.rpc_io_timeout_s);
}

// A 1-byte buffer on an RPC device (device_plan::rpc_anchors), freed quietly: its worker may be gone by then.
// Its allocation is the first request after the handshake, on a connection of its own (ggml closed the handshake's):
// bounded by timeout_ms, as the connection is not yet bounded by set_io_timeouts.
static std::shared_ptr<ggml_backend_buffer> anchor_connection(ggml_backend_dev_t dev, int timeout_ms) {
    const std::string endpoint = rpc_endpoint(dev);
    auto allocated = std::make_shared<ggml_backend_buffer_t>(nullptr);
    const rpc_outcome outcome = run_within(endpoint, timeout_ms, [allocated, dev] {
        *allocated = ggml_backend_buft_alloc_buffer(ggml_backend_dev_buffer_type(dev), 1);
    });
    if (!outcome.answered) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s answered ggml's handshake but not its first request within %d ms "
             "(a worker that stopped answering?)", endpoint.c_str(), timeout_ms);
    }
    ggml_backend_buffer_t buf = *allocated;
    if (!outcome.error.empty() || !buf) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s: cannot allocate on it%s%s", endpoint.c_str(),
             outcome.error.empty() ? "" : ": ", outcome.error.c_str());
    }
    return std::shared_ptr<ggml_backend_buffer>(buf, [](ggml_backend_buffer_t b) {
        free_quietly([b] { ggml_backend_buffer_free(b); });
    });
}

// Connects to each worker once (two spellings of one worker would wait on each other: a worker serves one
// client connection at a time), bounding its calls as soon as it answers.
static std::vector<ggml_backend_dev_t> connect_workers(device_plan & plan, const mllama_model_params & params) {
    const int timeout_ms = params.rpc_timeout_ms > 0 ? params.rpc_timeout_ms : k_default_rpc_timeout_ms;
    std::vector<ggml_backend_dev_t> rpc_devices;
    std::vector<std::string> peers;
    for (const std::string & endpoint : split_list(params.rpc_servers)) {
        const std::string peer = rpc_peer(endpoint);
        const auto same = std::find(peers.begin(), peers.end(), peer);
        if (same != peers.end()) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC workers %s and %s are the same worker (%s): name each worker once",
                 plan.endpoints[static_cast<size_t>(same - peers.begin())].c_str(), endpoint.c_str(), peer.c_str());
        }
        const std::vector<ggml_backend_dev_t> served = rpc_connect(endpoint, timeout_ms);
        rpc_devices.insert(rpc_devices.end(), served.begin(), served.end());
        peers.push_back(peer);
        plan.endpoints.push_back(endpoint);
        plan.rpc_anchors.push_back(anchor_connection(served.front(), timeout_ms));
        bound_rpc_calls(plan);
    }
    return rpc_devices;
}

device_plan plan_devices(const mllama_model_params & params, int n_layer) {
    device_plan plan;
    plan.rpc_io_timeout_s = params.rpc_io_timeout_s > 0 ? params.rpc_io_timeout_s : k_default_rpc_io_timeout_s;
    const std::vector<ggml_backend_dev_t> rpc_devices = connect_workers(plan, params);
    choose_vision(plan, params, rpc_devices);
    const std::vector<std::string> names = split_list(params.devices);
    for (const std::string & name : names) plan.devices.push_back(select_device(name.c_str(), rpc_devices));
    if (names.empty()) {
        plan.devices = named_or_local_gpus(params.device ? params.device : "", plan.vision);
        for (ggml_backend_dev_t dev : rpc_devices) {  // each once (device="RPC0" named one of them)
            const bool listed = std::find(plan.devices.begin(), plan.devices.end(), dev) != plan.devices.end();
            if (!listed) plan.devices.push_back(dev);
        }
    }
    const bool cpu_only = plan.devices.empty() || (plan.devices.size() == 1 && is_cpu(plan.devices[0]));
    if (cpu_only) plan.devices.assign(1, cpu_device());
    choose_split(plan, params);
    const int wanted = params.n_gpu_layers < 0 ? n_layer : std::min(params.n_gpu_layers, n_layer);
    plan.n_offload = cpu_only ? 0 : wanted;
    const std::vector<int> split = split_layers(n_layer, plan.n_offload, plan.proportions);
    for (int d : split) plan.layers.push_back(d < 0 ? cpu_device() : plan.devices[static_cast<size_t>(d)]);
    plan.layers.push_back(plan.layers.empty() ? cpu_device() : plan.layers.back());  // the output: the last layer's
    return plan;
}

}  // namespace mllama
