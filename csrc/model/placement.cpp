#include "model/placement.h"

#include "common/error.h"
#include "gguf/conventions.h"
#include "gguf/gguf_file.h"
#include "model/model.h"
#include "model/repack.h"
#include "runtime/backend.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace mllama {

ggml_context * new_descriptor_context(size_t n_tensors) {
    ggml_init_params params = {/*mem_size =*/ggml_tensor_overhead() * (n_tensors + 1), /*mem_buffer =*/nullptr,
                               /*no_alloc =*/true};
    ggml_context * ctx = ggml_init(params);
    if (!ctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create a ggml context for %zu tensors", n_tensors);
    return ctx;
}

ggml_context * placement::context_for(ggml_backend_dev_t dev) const {
    if (is_cpu(dev)) return cpu;
    for (const auto & [d, ctx] : others) {
        if (d == dev) return ctx;
    }
    fail(MLLAMA_ERR_INTERNAL, "no descriptor context for device %s", ggml_backend_dev_name(dev));
}

// Quantized text matrices that ggml multiplies faster from one of its extra layouts (repack.h) go there
// (copied out of the mapping, whose pages are then released); the embedding table stays (it is read by rows).
static void allocate_repacked(mllama_model & m, ggml_context * ctx, const tensor_loader & loader) {
    std::vector<ggml_tensor *> candidates;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        if (t != m.text.token_embd) candidates.push_back(t);
    }
    const std::vector<repack_choice> plan = repack_plan(candidates, m.params.repack);
    for (const auto & choice : plan) {
        const tensor_source & src = loader.source(choice.first);
        m.repacked[ggml_get_name(choice.first)] = file_span{src.file, src.file->data_offset(src.name)};
    }
    for (ggml_backend_buffer_t buf : load_repacked(plan, m.repacked, m.params.n_threads)) m.buffers.push_back(buf);
}

// CPU tensors not repacked point into the mapping of their file (one buffer wraps each mapping).
static void allocate_mapped(mllama_model & m, ggml_context * ctx, ggml_backend_dev_t dev,
                            const tensor_loader & loader) {
    for (const auto & file : m.files) {
        size_t max_size = 0;
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
            if (!t->buffer && loader.source(t).file == file.get()) max_size = std::max(max_size, ggml_nbytes(t));
        }
        if (max_size == 0) continue;
        uint8_t * base = const_cast<uint8_t *>(file->mapping());
        ggml_backend_buffer_t buf = ggml_backend_dev_buffer_from_host_ptr(dev, base, file->size(), max_size);
        if (!buf) fail(MLLAMA_ERR_BACKEND, "cannot wrap the mapping of '%s' in a CPU buffer", file->path().c_str());
        m.buffers.push_back(buf);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
            const tensor_source & src = loader.source(t);
            if (t->buffer || src.file != file.get()) continue;  // repacked, or in the other file
            if (ggml_backend_tensor_alloc(buf, t, base + file->data_offset(src.name)) != GGML_STATUS_SUCCESS) {
                fail(MLLAMA_ERR_BACKEND, "cannot place tensor '%s'", ggml_get_name(t));
            }
        }
    }
}

// One buffer of the device for the whole context, the data read (or copied from the mapping) in.
static void allocate_copied(mllama_model & m, ggml_context * ctx, ggml_backend_dev_t dev,
                            const tensor_loader & loader) {
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(dev));
    if (!buf) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the weights on %s", ggml_backend_dev_name(dev));
    m.buffers.push_back(buf);
    bound_rpc_calls(m.plan);  // the buffer's connection, before its weights are sent
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    std::vector<uint8_t> staging;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        const tensor_source & src = loader.source(t);
        const uint64_t offset = src.file->data_offset(src.name);
        if (ggml_backend_buffer_is_host(buf)) {
            src.file->read(offset, t->data, ggml_nbytes(t));
        } else if (src.file->mapping()) {
            ggml_backend_tensor_set(t, src.file->mapping() + offset, 0, ggml_nbytes(t));
        } else {
            staging.resize(ggml_nbytes(t));
            src.file->read(offset, staging.data(), staging.size());
            ggml_backend_tensor_set(t, staging.data(), 0, staging.size());
        }
    }
}

void allocate(mllama_model & m, ggml_context * ctx, ggml_backend_dev_t dev, bool use_mmap,
              const tensor_loader & loader) {
    if (!ggml_get_first_tensor(ctx)) return;
    if (use_mmap && is_cpu(dev)) {
        allocate_repacked(m, ctx, loader);
        allocate_mapped(m, ctx, dev, loader);
    } else {
        allocate_copied(m, ctx, dev, loader);
    }
}

// Ollama permuted the cross-attention q/k rows (RoPE-style, per head) but not q_norm/k_norm: give
// the norms the same permutation, so the normalized q.k products equal the reference's.
void permute_cross_norms(mllama_model & m) {
    for (size_t il = 0; il < m.text.layers.size(); ++il) {
        text_layer_w & l = m.text.layers[il];
        if (!l.is_cross) continue;
        ggml_context * ctx = new_descriptor_context(2);
        m.contexts.push_back(ctx);
        std::vector<std::pair<ggml_tensor *, std::vector<float>>> values;
        for (ggml_tensor ** norm : {&l.cross.q_norm, &l.cross.k_norm}) {
            std::vector<float> v(static_cast<size_t>(ggml_nelements(*norm)));
            ggml_backend_tensor_get(*norm, v.data(), 0, v.size() * sizeof(float));
            ggml_tensor * t = ggml_dup_tensor(ctx, *norm);
            ggml_format_name(t, "%s (permuted)", ggml_get_name(*norm));
            values.emplace_back(t, rope_permute_head(v));
            *norm = t;
        }
        ggml_backend_dev_t dev = m.plan.layers[il];  // beside the layer's other weights
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(dev));
        if (!buf) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the permuted norms on %s", ggml_backend_dev_name(dev));
        m.buffers.push_back(buf);
        for (auto & [t, v] : values) ggml_backend_tensor_set(t, v.data(), 0, v.size() * sizeof(float));
    }
}

// parts[0..n) lie one after the other in one CPU_REPACK buffer, with one type and input size: the longest such prefix.
static int adjacent_prefix(const std::vector<ggml_tensor *> & parts) {
    ggml_tensor * first = parts[0];
    if (!first || !first->buffer || std::strcmp(ggml_backend_buffer_name(first->buffer), "CPU_REPACK") != 0) return 0;
    int n = 1;
    for (; n < static_cast<int>(parts.size()); ++n) {
        const ggml_tensor * prev = parts[n - 1], * t = parts[n];
        if (!t || t->buffer != first->buffer || t->type != first->type || t->ne[0] != first->ne[0] ||
            t->extra != first->extra ||  // the same repacked layout (ggml picks one by type and rows)
            static_cast<const uint8_t *>(t->data) != static_cast<const uint8_t *>(prev->data) + ggml_nbytes(prev)) {
            break;
        }
    }
    return n;
}

// A [K, sum of M] tensor over parts' data (their adjacent prefix), or an empty fused_w where it has one part or
// where ggml would give the whole another repacked layout than its parts (it picks one by the number of rows).
static fused_w fuse(ggml_context * ctx, const std::vector<ggml_tensor *> & parts, const char * name) {
    const int n = adjacent_prefix(parts);
    if (n < 2) return {};
    int64_t rows = 0;
    for (int i = 0; i < n; ++i) rows += parts[i]->ne[1];
    ggml_tensor * t = ggml_new_tensor_2d(ctx, parts[0]->type, parts[0]->ne[0], rows);  // [K, M_0 + ... + M_n-1]
    ggml_set_name(t, name);
    // the buffer's init_tensor gives it its repacked layout (extra); a descriptor left unused costs nothing
    if (ggml_backend_tensor_alloc(parts[0]->buffer, t, parts[0]->data) != GGML_STATUS_SUCCESS) {
        fail(MLLAMA_ERR_BACKEND, "cannot place the fused matrix '%s'", name);
    }
    return t->extra == parts[0]->extra ? fused_w{t, n} : fused_w{};
}

int fuse_projections(mllama_model & m) {
    ggml_context * ctx = new_descriptor_context(2 * m.text.layers.size());
    m.contexts.push_back(ctx);
    int n_groups = 0;
    for (size_t il = 0; il < m.text.layers.size(); ++il) {
        text_layer_w & l = m.text.layers[il];
        char name[GGML_MAX_NAME];
        if (!l.is_cross) {
            std::snprintf(name, sizeof(name), "blk.%zu.attn_qkv (fused)", il);
            l.self.qkv = fuse(ctx, {l.self.wq, l.self.wk, l.self.wv}, name);
            n_groups += l.self.qkv.w != nullptr;
        }
        std::snprintf(name, sizeof(name), "blk.%zu.ffn_gate_up (fused)", il);
        l.ffn.gate_up = fuse(ctx, {l.ffn.gate, l.ffn.up}, name);
        n_groups += l.ffn.gate_up.w != nullptr;
    }
    return n_groups;
}

}  // namespace mllama
