// C ABI shims of the model: load/free, hyperparameters, info, integer arrays, weight tensors.
#include "mllama.h"

#include "api/guard.h"
#include "model/model.h"
#include "runtime/context.h"

using mllama::guarded;
using mllama::require;

extern "C" {

mllama_model_params mllama_model_default_params(void) { return mllama::default_model_params(); }

mllama_status mllama_model_load(const char * path, const char * projector_path, const mllama_model_params * params,
                                mllama_model ** out_model) {
    if (params && params->rpc_servers && *params->rpc_servers) mllama::note_rpc_use();  // (this load runs alone too)
    return guarded([&] {
        require(out_model, "model_load needs an output pointer");
        *out_model = nullptr;
        require(path && *path, "model_load needs a path");
        const mllama_model_params p = params ? *params : mllama::default_model_params();
        *out_model = mllama::load_model(path, projector_path, p).release();
    });
}

void mllama_model_free(mllama_model * model) {
    const std::unique_lock<std::recursive_mutex> exclusive = mllama::rpc_exclusive();  // (frees on workers)
    delete model;
}

mllama_status mllama_model_get_hparams(const mllama_model * model, mllama_hparams * out) {
    return guarded([&] {
        require(model && out, "model_get_hparams needs a model and an output struct");
        *out = mllama::abi_hparams(model->hp);
    });
}

mllama_status mllama_model_get_info(const mllama_model * model, mllama_model_info * out) {
    return guarded([&] {
        require(model && out, "model_get_info needs a model and an output struct");
        *out = model->info;
        out->lost_worker = model->lost_worker ? 1 : 0;
    });
}

int32_t mllama_model_get_placement(const mllama_model * model, mllama_placement * out, int32_t cap) {
    if (!model) return mllama::count_error("null model");
    const int32_t n = static_cast<int32_t>(model->placement.size());
    for (int32_t i = 0; out && i < cap && i < n; ++i) out[i] = model->placement[static_cast<size_t>(i)];
    return n;
}

int32_t mllama_model_cross_layers(const mllama_model * model, int32_t * buf, int32_t cap) {
    if (!model) return mllama::count_error("null model");
    return mllama::copy_ints(model->hp.text.cross_layers, buf, cap);
}

int32_t mllama_model_cache_type(const mllama_model * model, int32_t precision) {
    if (!model) return mllama::count_error("null model");
    if (precision < -1 || precision > 1) return mllama::count_error("precision takes 1 (F32), 0 (F16) or -1 (auto)");
    return mllama::cache_type(*model, precision);
}

int32_t mllama_model_intermediate_layers(const mllama_model * model, int32_t * buf, int32_t cap) {
    if (!model) return mllama::count_error("null model");
    return mllama::copy_ints(model->hp.vision.intermediate_layers, buf, cap);
}

int32_t mllama_model_aspect_ratios(const mllama_model * model, int32_t * buf, int32_t cap) {
    if (!model) return mllama::count_error("null model");
    return mllama::copy_ints(mllama::flatten(model->hp.vision.aspect_ratios), buf, cap);
}

int64_t mllama_model_tensor_count(const mllama_model * model) {
    return model ? static_cast<int64_t>(model->tensors.size()) : -1;
}

mllama_status mllama_model_tensor_get_info(const mllama_model * model, int64_t index, mllama_tensor_info * out) {
    return guarded([&] {
        require(model && out, "model_tensor_get_info needs a model and an output struct");
        require(index >= 0 && index < static_cast<int64_t>(model->tensors.size()), "tensor index out of range");
        *out = mllama::tensor_info(*model, index);
    });
}

mllama_status mllama_model_tensor_read_f32(const mllama_model * model, const char * name, float * dst,
                                           int64_t n_elements) {
    return guarded([&] {
        require(model && name && dst, "model_tensor_read_f32 needs a model, a name and a buffer");
        mllama::read_weight_f32(*model, name, dst, n_elements);
    });
}

}  // extern "C"
