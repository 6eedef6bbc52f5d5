// C ABI shims: validate arguments, catch every exception, turn it into a status code and the
// thread-local last-error text. No logic lives here.
#include "mllama.h"

#include "gguf/names.h"
#include "runtime/backend.h"
#include "runtime/context.h"
#include "common/error.h"
#include "api/guard.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "model/model.h"
#include "gguf/quant.h"

#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#ifndef MLLAMA_VERSION_STRING
#define MLLAMA_VERSION_STRING "0.0.0"
#endif

namespace {

using mllama::guarded;

thread_local std::string t_last_error;

mllama_status set_error(mllama_status status, const char * msg) {
    t_last_error = msg ? msg : "";
    return status;
}

}  // namespace

void mllama::set_last_error(const char * msg) { t_last_error = msg ? msg : ""; }

namespace {

void require(bool ok, const char * what) {
    if (!ok) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "%s", what);
}

int32_t copy_ints(const std::vector<int> & values, int32_t * buf, int32_t cap) {
    for (int32_t i = 0; buf && i < cap && i < static_cast<int32_t>(values.size()); ++i) buf[i] = values[i];
    return static_cast<int32_t>(values.size());
}

}  // namespace

extern "C" {

uint32_t mllama_abi_version(void) { return MLLAMA_ABI_VERSION; }

const char * mllama_version(void) { return MLLAMA_VERSION_STRING; }

const char * mllama_last_error(void) { return t_last_error.c_str(); }

const char * mllama_status_name(mllama_status status) {
    switch (status) {
        case MLLAMA_OK: return "ok";
        case MLLAMA_ERR_INVALID_ARGUMENT: return "invalid argument";
        case MLLAMA_ERR_IO: return "i/o error";
        case MLLAMA_ERR_FORMAT: return "bad file format";
        case MLLAMA_ERR_MODEL: return "bad model";
        case MLLAMA_ERR_UNSUPPORTED: return "unsupported";
        case MLLAMA_ERR_OUT_OF_MEMORY: return "out of memory";
        case MLLAMA_ERR_BACKEND: return "backend error";
        case MLLAMA_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

mllama_status mllama_system_info(char * buf, size_t cap) {
    return guarded([&] {
        require(buf && cap > 0, "system_info needs a buffer");
        std::snprintf(buf, cap, "%s", mllama::system_info().c_str());
    });
}

int32_t mllama_device_count(void) { return mllama::device_count(); }

mllama_status mllama_device_get_info(int32_t index, mllama_device_info * out) {
    return guarded([&] {
        require(out, "device_get_info needs an output struct");
        *out = mllama::device_info(mllama::device_at(index));
    });
}

int32_t mllama_name_count(void) { return mllama::name_count(); }

mllama_status mllama_name_get(int32_t index, mllama_name_entry * out) {
    return guarded([&] {
        require(out, "name_get needs an output struct");
        require(index >= 0 && index < mllama::name_count(), "name index out of range");
        const mllama::name_entry & e = mllama::name_at(index);
        *out = mllama_name_entry{e.id, e.name, e.is_tensor ? 1 : 0};
    });
}

int32_t mllama_type_count(void) { return GGML_TYPE_COUNT; }

mllama_status mllama_type_get_info(int32_t type, mllama_type_info * out) {
    return guarded([&] {
        require(out, "type_get_info needs an output struct");
        *out = mllama::type_info(type);
    });
}

mllama_status mllama_quantize(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                              uint64_t dst_size, uint64_t * n_written) {
    return guarded([&] {
        const uint64_t n = mllama::quantize(type, src, n_rows, n_per_row, dst, dst_size);
        if (n_written) *n_written = n;
    });
}

mllama_status mllama_dequantize(int32_t type, const void * src, uint64_t src_size, float * dst, int64_t n_elements) {
    return guarded([&] { mllama::dequantize(type, src, src_size, dst, n_elements); });
}

mllama_model_params mllama_model_default_params(void) {
    mllama_model_params p{};
    p.n_threads = 0;
    p.device = nullptr;
    p.n_gpu_layers = -1;
    p.use_mmap = 1;
    p.check_tensors = 0;
    p.log_level = MLLAMA_LOG_WARN;
    p.log_callback = nullptr;
    p.log_user_data = nullptr;
    return p;
}

mllama_status mllama_model_load(const char * path, const char * projector_path, const mllama_model_params * params,
                                mllama_model ** out_model) {
    return guarded([&] {
        require(out_model, "model_load needs an output pointer");
        *out_model = nullptr;
        require(path && *path, "model_load needs a path");
        const mllama_model_params p = params ? *params : mllama_model_default_params();
        *out_model = mllama::load_model(path, projector_path, p).release();
    });
}

void mllama_model_free(mllama_model * model) { delete model; }

mllama_status mllama_model_get_hparams(const mllama_model * model, mllama_hparams * out) {
    return guarded([&] {
        require(model && out, "model_get_hparams needs a model and an output struct");
        const mllama::hparams & hp = model->hp;
        const mllama::text_hparams & t = hp.text;
        const mllama::vision_hparams & v = hp.vision;
        mllama_hparams h{};
        h.n_vocab = static_cast<int32_t>(t.n_vocab);
        h.n_vocab_embd = static_cast<int32_t>(t.n_vocab_embd);
        h.n_tokens = static_cast<int32_t>(hp.tokens.n_tokens);
        h.n_ctx_train = static_cast<int32_t>(std::min<int64_t>(t.n_ctx_train, INT32_MAX));
        h.n_embd = static_cast<int32_t>(t.n_embd);
        h.n_ff = static_cast<int32_t>(t.n_ff);
        h.n_layer = static_cast<int32_t>(t.n_layer);
        h.n_cross_layer = static_cast<int32_t>(t.cross_layers.size());
        h.n_head = static_cast<int32_t>(t.n_head);
        h.n_head_kv = static_cast<int32_t>(t.n_head_kv);
        h.n_embd_head = static_cast<int32_t>(t.n_embd_head);
        h.rms_norm_eps = t.rms_norm_eps;
        h.rope_freq_base = t.rope_freq_base;
        h.rope_scaling = static_cast<int32_t>(t.rope_scaling);
        h.rope_scaling_factor = t.rope_factor;
        h.rope_low_freq_factor = t.rope_low_freq_factor;
        h.rope_high_freq_factor = t.rope_high_freq_factor;
        h.rope_orig_ctx = static_cast<int32_t>(t.rope_orig_ctx);
        h.image_token_id = static_cast<int32_t>(hp.tokens.image);
        h.bos_token_id = static_cast<int32_t>(hp.tokens.bos);
        h.eos_token_id = static_cast<int32_t>(hp.tokens.eos);
        h.eot_token_id = static_cast<int32_t>(hp.tokens.eot);
        h.eom_token_id = static_cast<int32_t>(hp.tokens.eom);
        h.pad_token_id = static_cast<int32_t>(hp.tokens.pad);
        h.v_n_embd = static_cast<int32_t>(v.n_embd);
        h.v_n_ff = static_cast<int32_t>(v.n_ff);
        h.v_n_layer = static_cast<int32_t>(v.n_layer);
        h.v_n_global_layer = static_cast<int32_t>(v.n_global_layer);
        h.v_n_head = static_cast<int32_t>(v.n_head);
        h.v_n_intermediate = static_cast<int32_t>(v.intermediate_layers.size());
        h.v_image_size = static_cast<int32_t>(v.image_size);
        h.v_patch_size = static_cast<int32_t>(v.patch_size);
        h.v_n_channels = static_cast<int32_t>(v.n_channels);
        h.v_max_tiles = static_cast<int32_t>(v.max_tiles);
        h.v_n_patches = static_cast<int32_t>(v.n_patches());
        h.v_n_positions = static_cast<int32_t>(v.n_positions());
        h.v_n_aspect_ratios = static_cast<int32_t>(v.aspect_ratios.size());
        h.v_output_dim = static_cast<int32_t>(v.output_dim());
        h.v_norm_eps = v.norm_eps;
        for (int c = 0; c < 3; ++c) {
            h.image_mean[c] = v.image_mean[c];
            h.image_std[c] = v.image_std[c];
        }
        h.projection_dim = static_cast<int32_t>(v.projection_dim);
        *out = h;
    });
}

mllama_status mllama_model_get_info(const mllama_model * model, mllama_model_info * out) {
    return guarded([&] {
        require(model && out, "model_get_info needs a model and an output struct");
        *out = model->info;
    });
}

int32_t mllama_model_cross_layers(const mllama_model * model, int32_t * buf, int32_t cap) {
    if (!model) return set_error(MLLAMA_ERR_INVALID_ARGUMENT, "null model"), -1;
    return copy_ints(model->hp.text.cross_layers, buf, cap);
}

int32_t mllama_model_intermediate_layers(const mllama_model * model, int32_t * buf, int32_t cap) {
    if (!model) return set_error(MLLAMA_ERR_INVALID_ARGUMENT, "null model"), -1;
    return copy_ints(model->hp.vision.intermediate_layers, buf, cap);
}

int32_t mllama_model_aspect_ratios(const mllama_model * model, int32_t * buf, int32_t cap) {
    if (!model) return set_error(MLLAMA_ERR_INVALID_ARGUMENT, "null model"), -1;
    std::vector<int> flat;
    for (const auto & [h, w] : model->hp.vision.aspect_ratios) {
        flat.push_back(h);
        flat.push_back(w);
    }
    return copy_ints(flat, buf, cap);
}

int64_t mllama_model_tensor_count(const mllama_model * model) { return model ? static_cast<int64_t>(model->tensors.size()) : -1; }

mllama_status mllama_model_tensor_get_info(const mllama_model * model, int64_t index, mllama_tensor_info * out) {
    return guarded([&] {
        require(model && out, "model_tensor_get_info needs a model and an output struct");
        require(index >= 0 && index < static_cast<int64_t>(model->tensors.size()), "tensor index out of range");
        auto it = model->tensors.begin();
        std::advance(it, index);
        const ggml_tensor * t = it->second;
        mllama_tensor_info info{};
        std::snprintf(info.name, sizeof(info.name), "%s", it->first.c_str());
        info.type = t->type;
        info.n_dims = ggml_n_dims(t);
        for (int i = 0; i < 4; ++i) info.ne[i] = t->ne[i];
        info.n_bytes = ggml_nbytes(t);
        std::snprintf(info.buffer, sizeof(info.buffer), "%s", t->buffer ? ggml_backend_buffer_name(t->buffer) : "");
        *out = info;
    });
}

mllama_status mllama_model_tensor_read_f32(const mllama_model * model, const char * name, float * dst, int64_t n_elements) {
    return guarded([&] {
        require(model && name && dst, "model_tensor_read_f32 needs a model, a name and a buffer");
        auto it = model->tensors.find(name);
        if (it == model->tensors.end()) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "the model has no tensor '%s'", name);
        const ggml_tensor * t = it->second;
        if (n_elements != ggml_nelements(t)) {
            mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "tensor '%s' has %lld elements, the buffer %lld", name, (long long) ggml_nelements(t), (long long) n_elements);
        }
        std::vector<uint8_t> raw(ggml_nbytes(t));
        mllama::read_weight(*model, t, raw.data());
        mllama::dequantize(t->type, raw.data(), raw.size(), dst, n_elements);
    });
}

mllama_context_params mllama_context_default_params(void) {
    mllama_context_params p{};
    p.n_ctx = 0;
    p.n_batch = 512;
    p.n_threads = 0;
    p.n_image_slots = 4;
    p.cross_kv_f32 = -1;
    p.kv_f32 = -1;
    p.dump_dir = nullptr;
    p.dump_filter = nullptr;
    return p;
}

mllama_status mllama_context_init(const mllama_model * model, const mllama_context_params * params, mllama_context ** out_context) {
    return guarded([&] {
        require(model && out_context, "context_init needs a model and an output pointer");
        *out_context = nullptr;
        const mllama_context_params p = params ? *params : mllama_context_default_params();
        *out_context = mllama::new_context(*model, p).release();
    });
}

void mllama_context_free(mllama_context * context) { delete context; }

mllama_status mllama_context_get_params(const mllama_context * context, mllama_context_params * out) {
    return guarded([&] {
        require(context && out, "context_get_params needs a context and an output struct");
        *out = context->params;
        out->dump_dir = nullptr;
        out->dump_filter = nullptr;
    });
}

mllama_status mllama_context_encode_image(mllama_context * context, int32_t slot, const float * pixels, int64_t n_pixels,
                                          int32_t aspect_ratio_id, int32_t n_tiles, float * features, int64_t n_features) {
    return guarded([&] {
        require(context, "context_encode_image needs a context");
        mllama::encode_image(*context, slot, pixels, n_pixels, aspect_ratio_id, n_tiles, features, n_features);
    });
}

mllama_status mllama_context_read_cross_kv(const mllama_context * context, int32_t slot, int32_t cross_index, float * k,
                                           float * v, int64_t n) {
    return guarded([&] {
        require(context, "context_read_cross_kv needs a context");
        mllama::read_cross_kv(*context, slot, cross_index, k, v, n);
    });
}

mllama_status mllama_context_decode(mllama_context * context, const int32_t * tokens, int32_t n_tokens, int32_t n_past,
                                   int32_t n_images, const uint8_t * row_images, const int32_t * out_rows, int32_t n_out,
                                   float * logits) {
    return guarded([&] {
        require(context, "context_decode needs a context");
        mllama::decode(*context, tokens, n_tokens, n_past, n_images, row_images, out_rows, n_out, logits);
    });
}

int64_t mllama_context_n_decoded(const mllama_context * context) { return context ? context->n_decoded : -1; }

mllama_status mllama_context_get_memory(const mllama_context * context, mllama_context_memory * out) {
    return guarded([&] {
        if (!context || !out) mllama::fail(MLLAMA_ERR_INVALID_ARGUMENT, "context and out must not be NULL");
        *out = mllama::context_memory(*context);
    });
}

}  // extern "C"
