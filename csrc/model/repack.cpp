#include "model/repack.h"

#include "common/error.h"
#include "common/parallel.h"
#include "gguf/gguf_file.h"
#include "runtime/backend.h"
#include "runtime/pages.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cstring>

namespace mllama {

static ggml_backend_buffer_type_t repack_buffer_type(bool enabled) {
    if (!enabled) return nullptr;
    ggml_backend_dev_t cpu = cpu_device();
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts"));
    if (!get_extra) return nullptr;
    for (ggml_backend_buffer_type_t * b = get_extra(cpu); b && *b; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    }
    return nullptr;
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

std::vector<ggml_tensor *> repackable(const std::vector<ggml_tensor *> & candidates, bool enabled) {
    std::vector<ggml_tensor *> out;
    ggml_backend_buffer_type_t buft = repack_buffer_type(enabled);
    if (!buft) return out;
    for (ggml_tensor * t : candidates) {
        if (ggml_is_quantized(t->type) && ggml_n_dims(t) == 2 && supported(buft, t)) out.push_back(t);
    }
    return out;
}

ggml_backend_buffer * load_repacked(const std::vector<ggml_tensor *> & weights,
                                    const std::map<std::string, file_span> & spans, int n_threads) {
    if (weights.empty()) return nullptr;
    ggml_backend_buffer_type_t buft = repack_buffer_type(true);  // weights come from repackable: it exists
    if (!buft) return nullptr;
    std::vector<const uint8_t *> sources;  // looked up before anything is allocated (the work items must not throw)
    for (ggml_tensor * t : weights) {
        const file_span & span = spans.at(ggml_get_name(t));
        sources.push_back(span.file->mapping() + span.offset);
    }
    const size_t align = ggml_backend_buft_get_alignment(buft);
    size_t total = 0;
    for (ggml_tensor * t : weights) total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, total);
    if (!buf) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB for the repacked weights", total / 1048576.0);
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    ggml_tallocr alloc = ggml_tallocr_new(buf);
    for (ggml_tensor * t : weights) {
        if (ggml_tallocr_alloc(&alloc, t) != GGML_STATUS_SUCCESS) {
            ggml_backend_buffer_free(buf);
            fail(MLLAMA_ERR_BACKEND, "cannot place '%s' in the repack buffer", ggml_get_name(t));
        }
    }
    // ggml repacks while copying, one tensor per call: the tensors are split across threads
    parallel_for(weights.size(), n_threads, [&](size_t i) {
        ggml_backend_tensor_set(weights[i], sources[i], 0, ggml_nbytes(weights[i]));
        drop_pages(sources[i], ggml_nbytes(weights[i]));
    });
    return buf;
}

}  // namespace mllama
