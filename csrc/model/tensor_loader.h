// Finds canonical tensors in the model files (translating names for the file's conventions),
// checks their shape and type, and creates their descriptors in the ggml context they go to.
#pragma once

#include "gguf/names.h"

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

struct ggml_context;
struct ggml_tensor;

namespace mllama {

class gguf_file;
struct conventions;

enum class wkind {
    f32,     // norms, biases, gates, CLS: F32 only
    floats,  // embeddings tables: F32, F16 or BF16
    matrix,  // matmul weights: any type ggml can dequantize, rows a whole number of blocks
};

// Where a loaded tensor's data lives: which file, under which name.
struct tensor_source {
    const gguf_file * file = nullptr;
    std::string name;
};

class tensor_loader {
  public:
    tensor_loader(std::vector<const gguf_file *> files, const conventions & conv)
        : files_(std::move(files)), conv_(conv) {}

    // shape in ggml order; a missing tensor fails with MLLAMA_ERR_MODEL (load) or gives nullptr (load_optional)
    ggml_tensor * load(ggml_context * ctx, tn id, int layer, std::vector<int64_t> shape, wkind kind);
    ggml_tensor * load_optional(ggml_context * ctx, tn id, int layer, std::vector<int64_t> shape, wkind kind);
    ggml_tensor * descriptor(tn id, int layer = -1) const;  // nullptr if absent
    const tensor_source & source(const ggml_tensor * t) const { return sources_.at(t); }
    // Tensors of the files that no component asked for (reported as warnings).
    std::vector<std::string> unused() const;

  private:
    tensor_source find(const std::string & canonical) const;

    std::vector<const gguf_file *> files_;
    const conventions & conv_;
    std::set<std::pair<const gguf_file *, std::string>> used_;
    std::map<const ggml_tensor *, tensor_source> sources_;
};

}  // namespace mllama
