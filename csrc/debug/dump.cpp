#include "debug/dump.h"

#include "common/error.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

namespace mllama {

// Write a float32 array in NumPy's .npy format; shape in NumPy order.
static void write_npy(const std::string & path, const float * data, const long long * shape, int n_dims) {
    std::string dims;
    size_t count = 1;
    for (int i = 0; i < n_dims; ++i) {
        dims += std::to_string(shape[i]) + (n_dims == 1 || i + 1 < n_dims ? "," : "");
        count *= static_cast<size_t>(shape[i]);
    }
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
    const size_t total = 10 + header.size() + 1;
    header.append((64 - total % 64) % 64, ' ');
    header += '\n';
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) fail(MLLAMA_ERR_IO, "cannot write '%s'", path.c_str());
    const uint16_t len = static_cast<uint16_t>(header.size());
    out.write("\x93NUMPY\x01\x00", 8);
    out.write(reinterpret_cast<const char *>(&len), 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char *>(data), static_cast<std::streamsize>(count * sizeof(float)));
}

tensor_dumper::tensor_dumper(const std::string & dir, const std::string & filter) : dir_(dir) {
    try {
        filter_ = std::regex(filter.empty() ? ".*" : filter);
    } catch (const std::regex_error & e) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "invalid dump filter '%s': %s", filter.c_str(), e.what());
    }
    if (!dir_.empty()) {
        std::ofstream order(dir_ + "/order.txt", std::ios::trunc);
        if (!order) fail(MLLAMA_ERR_IO, "cannot write to dump folder '%s'", dir_.c_str());
    }
}

bool tensor_dumper::wanted(const ggml_tensor * t) const {
    const char * name = ggml_get_name(t);
    if (!*name || std::strchr(name, ' ') || std::strncmp(name, "node_", 5) == 0) return false;  // unnamed
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) return false;
    return std::regex_search(name, filter_);
}

bool tensor_dumper::callback(ggml_tensor * t, bool ask, void * user_data) {
    const auto * self = static_cast<const tensor_dumper *>(user_data);
    if (ask) return self->wanted(t);
    if (self->wanted(t)) self->write(t);
    return true;  // keep computing
}

void tensor_dumper::write(const ggml_tensor * t) const {
    const int64_t n = ggml_nelements(t);
    std::vector<float> values(static_cast<size_t>(n));
    if (ggml_is_contiguous(t)) {
        std::vector<uint8_t> raw(ggml_nbytes(t));
        ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
        if (t->type == GGML_TYPE_F32) std::memcpy(values.data(), raw.data(), raw.size());
        else ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(raw.data()), values.data(), n);
    } else {
        return;  // views are dumped through the contiguous nodes they come from
    }
    const int n_dims = ggml_n_dims(t);
    long long shape[GGML_MAX_DIMS];
    for (int i = 0; i < n_dims; ++i) shape[i] = t->ne[n_dims - 1 - i];
    write_npy(dir_ + "/" + ggml_get_name(t) + ".npy", values.data(), shape, n_dims);
    std::ofstream(dir_ + "/order.txt", std::ios::app) << ggml_get_name(t) << "\n";
}

}  // namespace mllama
