#include "model/report.h"

#include "model/model.h"
#include "runtime/backend.h"
#include "runtime/rpc.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdio>
#include <string>

namespace mllama {

static uint64_t bytes_of(std::initializer_list<const ggml_tensor *> tensors) {
    uint64_t n = 0;
    for (const ggml_tensor * t : tensors) n += t ? ggml_nbytes(t) : 0;
    return n;
}

static uint64_t layer_bytes(const text_layer_w & l) {
    return bytes_of({l.attn_norm, l.ffn_norm, l.ffn.gate, l.ffn.up, l.ffn.down, l.self.wq, l.self.wk, l.self.wv,
                     l.self.wo, l.cross.wq, l.cross.wk, l.cross.wv, l.cross.wo, l.cross.q_norm, l.cross.k_norm,
                     l.cross.attn_gate, l.cross.mlp_gate});
}

static mllama_placement entry(const char * component, ggml_backend_dev_t dev, uint64_t n_bytes,
                              const std::string & why) {
    mllama_placement e{};
    std::snprintf(e.component, sizeof(e.component), "%s", component);
    e.first_layer = -1;
    std::snprintf(e.device, sizeof(e.device), "%s", ggml_backend_dev_name(dev));
    std::snprintf(e.endpoint, sizeof(e.endpoint), "%s", rpc_endpoint(dev).c_str());
    e.n_bytes = n_bytes;
    std::snprintf(e.reason, sizeof(e.reason), "%s", why.c_str());
    return e;
}

// Why text layer `il` is where it is.
static std::string text_reason(const mllama_model & m, int il) {
    const int n_layer = static_cast<int>(m.hp.text.n_layer);
    if (il >= n_layer - m.plan.n_offload) return m.plan.split_reason;
    const bool cpu_only = m.plan.devices.size() == 1 && is_cpu(m.plan.devices[0]);
    return cpu_only ? "no GPU or RPC device in the device list"
                    : "not offloaded (n_gpu_layers " + std::to_string(m.plan.n_offload) + ")";
}

void report_placement(mllama_model & m) {
    const text_w & t = m.text;
    const int n_layer = static_cast<int>(t.layers.size());
    uint64_t text_total = bytes_of({t.token_embd, t.output_norm, t.output, t.rope_freqs});
    for (const text_layer_w & l : t.layers) text_total += layer_bytes(l);
    m.placement.clear();
    m.placement.push_back(entry("vision", m.plan.vision, m.info.n_bytes_weights - text_total, m.plan.vision_reason));
    m.placement.push_back(entry("token_embd", cpu_device(), bytes_of({t.token_embd}), "a row lookup: on the CPU"));
    for (int first = 0; first < n_layer;) {
        ggml_backend_dev_t dev = m.plan.layers[first];
        int last = first;
        uint64_t n_bytes = 0;
        for (; last < n_layer && m.plan.layers[last] == dev; ++last) n_bytes += layer_bytes(t.layers[last]);
        mllama_placement e = entry("text", dev, n_bytes, text_reason(m, first));
        e.first_layer = first;
        e.n_layers = last - first;
        m.placement.push_back(e);
        first = last;
    }
    m.placement.push_back(entry("output", m.plan.layers.back(), bytes_of({t.output_norm, t.output, t.rope_freqs}),
                                "with the last text layer"));
    for (const mllama_placement & e : m.placement) {
        const std::string where = std::string(e.device) + (*e.endpoint ? std::string(" ") + e.endpoint : "");
        if (e.first_layer >= 0) {
            m.log.log(MLLAMA_LOG_INFO, "placement: text layers %d-%d on %s, %.1f MiB (%s)", e.first_layer,
                      e.first_layer + e.n_layers - 1, where.c_str(), e.n_bytes / 1048576.0, e.reason);
        } else {
            m.log.log(MLLAMA_LOG_INFO, "placement: %s on %s, %.1f MiB (%s)", e.component, where.c_str(),
                      e.n_bytes / 1048576.0, e.reason);
        }
    }
}

}  // namespace mllama
