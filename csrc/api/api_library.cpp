// C ABI shims of the library itself: version, last error, status names, system info, devices, the
// RPC worker and layer split, the names table, ggml's types and quantizer, the reference preprocessor's constants.
#include "mllama.h"

#include "api/guard.h"
#include "gguf/names.h"
#include "gguf/quant.h"
#include "model/hparams.h"
#include "model/devices.h"
#include "runtime/backend.h"
#include "runtime/rpc.h"

#include "ggml.h"

#include <cstdio>
#include <string>
#include <vector>

#ifndef MLLAMA_VERSION_STRING
#define MLLAMA_VERSION_STRING "0.0.0"
#endif

namespace {
thread_local std::string t_last_error;
}  // namespace

void mllama::set_last_error(const char * msg) { t_last_error = msg ? msg : ""; }

using mllama::guarded;
using mllama::require;

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

int32_t mllama_rpc_supported(void) { return mllama::rpc_supported() ? 1 : 0; }

mllama_status mllama_rpc_serve(const char * endpoint, const char * devices, int32_t n_threads, const char * cache_dir) {
    return guarded([&] {
        require(endpoint && *endpoint, "rpc_serve needs an endpoint host:port");
        mllama::rpc_serve(endpoint, devices ? devices : "", n_threads, cache_dir ? cache_dir : "");
    });
}

mllama_status mllama_split_layers(int32_t n_layer, int32_t n_offload, const float * proportions, int32_t n_devices,
                                  int32_t * out) {
    return guarded([&] {
        require(n_devices >= 0 && (proportions || n_devices == 0) && (out || n_layer == 0),
                "split_layers needs n_devices proportions and room for n_layer values");
        const std::vector<int> split =
            mllama::split_layers(n_layer, n_offload, std::vector<float>(proportions, proportions + n_devices));
        for (size_t i = 0; i < split.size(); ++i) out[i] = split[i];
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

void mllama_get_image_defaults(mllama_image_defaults * out) {
    if (!out) return;
    const mllama::image_defaults & d = mllama::reference_image_defaults();
    for (int c = 0; c < 3; ++c) {
        out->image_mean[c] = d.mean[c];
        out->image_std[c] = d.std[c];
    }
}

int32_t mllama_default_aspect_ratios(int32_t max_tiles, int32_t * buf, int32_t cap) {
    if (max_tiles < 1 || max_tiles > mllama::k_max_tiles_limit) return mllama::count_error("max_tiles out of range");
    return mllama::copy_ints(mllama::flatten(mllama::reference_aspect_ratios(max_tiles)), buf, cap);
}

}  // extern "C"
