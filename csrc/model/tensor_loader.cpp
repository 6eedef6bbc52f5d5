#include "model/tensor_loader.h"

#include "common/error.h"
#include "gguf/conventions.h"
#include "gguf/gguf_file.h"
#include "gguf/quant.h"

#include "ggml.h"

namespace mllama {

static void check_type(const std::string & name, const ggml_tensor * t, wkind kind) {
    const ggml_type type = t->type;
    const bool is_float = type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16;
    bool ok = false;
    switch (kind) {
        case wkind::f32: ok = type == GGML_TYPE_F32; break;
        case wkind::floats: ok = is_float; break;
        case wkind::matrix: ok = is_weight_type(type) && t->ne[0] % ggml_blck_size(type) == 0; break;
    }
    if (!ok) {
        const char * want = kind == wkind::f32 ? "F32" : kind == wkind::floats ? "F32, F16 or BF16" : "a float or quantized weight type";
        fail(MLLAMA_ERR_UNSUPPORTED, "tensor '%s' has unsupported type %s (expected %s)", name.c_str(),
             ggml_type_name(type), want);
    }
}

tensor_source tensor_loader::find(const std::string & canonical) const {
    const std::string name = file_tensor_name(conv_, canonical);
    for (const gguf_file * f : files_) {
        if (f->find(name)) return {f, name};
    }
    return {nullptr, name};
}

ggml_tensor * tensor_loader::descriptor(tn id, int layer) const {
    const tensor_source src = find(tensor_name(id, layer));
    return src.file ? src.file->find(src.name) : nullptr;
}

ggml_tensor * tensor_loader::load_optional(ggml_context * ctx, tn id, int layer, std::vector<int64_t> shape,
                                           wkind kind) {
    const std::string name = tensor_name(id, layer);
    const tensor_source src = find(name);
    if (!src.file) return nullptr;
    ggml_tensor * meta = src.file->find(src.name);
    long long want[GGML_MAX_DIMS] = {1, 1, 1, 1};
    for (size_t i = 0; i < shape.size(); ++i) want[i] = shape[i];
    bool same = true;
    for (int i = 0; i < GGML_MAX_DIMS; ++i) same = same && meta->ne[i] == want[i];
    if (!same) {
        const long long have[GGML_MAX_DIMS] = {meta->ne[0], meta->ne[1], meta->ne[2], meta->ne[3]};
        fail(MLLAMA_ERR_MODEL, "tensor '%s' has shape %s, expected %s (ggml order)", name.c_str(),
             shape_str(have, ggml_n_dims(meta)).c_str(), shape_str(want, static_cast<int>(shape.size())).c_str());
    }
    check_type(name, meta, kind);
    ggml_tensor * t = ggml_dup_tensor(ctx, meta);
    ggml_set_name(t, name.c_str());
    used_.emplace(src.file, src.name);
    sources_[t] = src;
    return t;
}

ggml_tensor * tensor_loader::load(ggml_context * ctx, tn id, int layer, std::vector<int64_t> shape, wkind kind) {
    ggml_tensor * t = load_optional(ctx, id, layer, std::move(shape), kind);
    if (!t) {
        const tensor_source src = find(tensor_name(id, layer));
        fail(MLLAMA_ERR_MODEL, "missing tensor '%s' in '%s'", src.name.c_str(), files_.back()->path().c_str());
    }
    return t;
}

std::vector<std::string> tensor_loader::unused() const {
    std::vector<std::string> out;
    for (const gguf_file * f : files_) {
        for (int64_t i = 0; i < f->n_tensors(); ++i) {
            if (!used_.count({f, f->tensor_name(i)})) out.emplace_back(f->tensor_name(i));
        }
    }
    return out;
}

}  // namespace mllama
