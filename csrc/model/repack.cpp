#include "model/repack.h"

#include "common/error.h"
#include "common/parallel.h"
#include "gguf/gguf_file.h"
#include "runtime/backend.h"
#include "runtime/pages.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>

namespace mllama {

// The CPU device's extra buffer types in ggml's order of preference (AMX before CPU_REPACK), AMX only
// with_amx (repack.h says why).
static std::vector<ggml_backend_buffer_type_t> extra_buffer_types(bool with_amx) {
    std::vector<ggml_backend_buffer_type_t> out;
    ggml_backend_dev_t cpu = cpu_device();
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts"));
    for (ggml_backend_buffer_type_t * b = get_extra ? get_extra(cpu) : nullptr; b && *b; ++b) {
        if (with_amx || std::strcmp(ggml_backend_buft_name(*b), "AMX") != 0) out.push_back(*b);
    }
    return out;
}

// Ask the CPU device whether it multiplies `w` from a repack buffer (the check ggml itself offers:
// a mat-mul node whose weight sits in a zero-size buffer of that type).
static bool supported(ggml_backend_buffer_type_t buft, ggml_tensor * w) {
    ggml_init_params params = {ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context * ctx = ggml_init(params);
    if (!ctx) return false;
    ggml_tensor * x = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, w->ne[0], 64, w->ne[2], w->ne[3]);
    ggml_tensor * op = ggml_mul_mat(ctx, w, x);
    ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(buft, 0);
    ggml_backend_buffer_t saved = w->buffer;
    w->buffer = probe;
    const bool ok = probe && ggml_backend_dev_supports_op(cpu_device(), op);
    w->buffer = saved;
    if (probe) ggml_backend_buffer_free(probe);
    ggml_free(ctx);
    return ok;
}

std::vector<repack_choice> repack_plan(const std::vector<ggml_tensor *> & candidates, int mode) {
    std::vector<repack_choice> out;
    if (mode == 0) return out;
    const std::vector<ggml_backend_buffer_type_t> types = extra_buffer_types(/*with_amx=*/mode == 2);
    for (ggml_tensor * t : candidates) {
        if (!ggml_is_quantized(t->type) || ggml_n_dims(t) != 2) continue;
        for (ggml_backend_buffer_type_t buft : types) {
            if (supported(buft, t)) {
                out.emplace_back(t, buft);
                break;
            }
        }
    }
    return out;
}

// One buffer of type `buft` holding `weights`, each filled from its span (see load_repacked).
static ggml_backend_buffer_t load_one_type(ggml_backend_buffer_type_t buft, const std::vector<ggml_tensor *> & weights,
                                           const std::map<std::string, file_span> & spans, int n_threads) {
    std::vector<const uint8_t *> sources;  // looked up before anything is allocated (the work items must not throw)
    for (ggml_tensor * t : weights) {
        const file_span & span = spans.at(ggml_get_name(t));
        sources.push_back(span.file->mapping() + span.offset);
    }
    const size_t align = ggml_backend_buft_get_alignment(buft);
    size_t total = 0;
    for (ggml_tensor * t : weights) total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, total);
    if (!buf) {
        fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB for the weights in ggml's %s layout",
             total / 1048576.0, ggml_backend_buft_name(buft));
    }
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    ggml_tallocr alloc = ggml_tallocr_new(buf);
    for (ggml_tensor * t : weights) {
        if (ggml_tallocr_alloc(&alloc, t) != GGML_STATUS_SUCCESS) {
            ggml_backend_buffer_free(buf);
            fail(MLLAMA_ERR_BACKEND, "cannot place '%s' in the %s buffer", ggml_get_name(t), ggml_backend_buft_name(buft));
        }
    }
    // ggml repacks while copying, one tensor per call: the tensors are split across threads
    parallel_for(weights.size(), n_threads, [&](size_t i) {
        ggml_backend_tensor_set(weights[i], sources[i], 0, ggml_nbytes(weights[i]));
        drop_pages(sources[i], ggml_nbytes(weights[i]));
    });
    return buf;
}

std::vector<ggml_backend_buffer *> load_repacked(const std::vector<repack_choice> & plan,
                                                 const std::map<std::string, file_span> & spans, int n_threads) {
    std::vector<ggml_backend_buffer_type_t> types;  // in the order first chosen
    for (const auto & [t, buft] : plan) {
        if (std::find(types.begin(), types.end(), buft) == types.end()) types.push_back(buft);
    }
    std::vector<ggml_backend_buffer *> buffers;
    try {
        for (ggml_backend_buffer_type_t buft : types) {
            std::vector<ggml_tensor *> weights;
            for (const auto & [t, b] : plan) {
                if (b == buft) weights.push_back(t);
            }
            buffers.push_back(load_one_type(buft, weights, spans, n_threads));
        }
    } catch (...) {
        for (ggml_backend_buffer * b : buffers) ggml_backend_buffer_free(b);
        throw;
    }
    return buffers;
}

std::string repack_summary(const std::map<std::string, ggml_tensor *> & tensors,
                           const std::map<std::string, file_span> & repacked) {
    std::vector<std::pair<std::string, int>> counts;
    for (const auto & entry : repacked) {
        auto it = tensors.find(entry.first);
        if (it == tensors.end() || !it->second->buffer) continue;
        const std::string name = ggml_backend_buffer_name(it->second->buffer);
        auto c = std::find_if(counts.begin(), counts.end(), [&](const auto & p) { return p.first == name; });
        if (c == counts.end()) counts.emplace_back(name, 1);
        else ++c->second;
    }
    std::string out;
    for (const auto & [name, n] : counts) out += (out.empty() ? "" : ", ") + name + " " + std::to_string(n);
    return out;
}

}  // namespace mllama
