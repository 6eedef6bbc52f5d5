// Where the weights go and the buffers that hold them: descriptors are created per device (the CPU
// and each other device in use), then allocated: CPU tensors point into the file mappings (or ggml's
// repacked CPU layout), device tensors are uploaded.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

struct ggml_context;
struct ggml_backend_device;
struct mllama_model;

namespace mllama {

class tensor_loader;

// Where the tensors of each component go: one ggml context of descriptors per device (the CPU's,
// then one per other device in use), and each text layer's device (device_plan::layers).
struct placement {
    ggml_context * cpu = nullptr;
    std::vector<std::pair<ggml_backend_device *, ggml_context *>> others;
    std::vector<ggml_backend_device *> layers;  // per text layer, then the output
    ggml_backend_device * vision = nullptr;

    // The descriptor context of a device in use (the CPU's for the CPU).
    ggml_context * context_for(ggml_backend_device * dev) const;
};

// A context for n_tensors descriptors (no data).
ggml_context * new_descriptor_context(size_t n_tensors);

// Allocate one context's tensors on `dev`: CPU tensors point into the file mappings when use_mmap
// (quantized text matrices ggml multiplies from its repacked layout go there when the model's
// params allow it), else a buffer of the device is allocated and the data copied in.
void allocate(mllama_model & m, ggml_context * ctx, ggml_backend_device * dev, bool use_mmap,
              const tensor_loader & loader);

// Ollama permuted the cross-attention q/k rows (RoPE-style, per head) but not q_norm/k_norm: give
// the norms the same permutation, so the normalized q.k products equal the reference's.
void permute_cross_norms(mllama_model & m);

// The text layers' q, k, v and gate, up matrices, where they lie one after the other in one buffer of ggml's
// CPU_REPACK type with the same type and input size (the loader places a buffer's weights in the order they were
// declared), each group viewed as one matrix (self_attn_w::qkv, ffn_w::gate_up): the decoder multiplies a group
// in one product (one pass over the weights, one quantization or rounding of the rows, one barrier of the
// threads). Each output channel is computed as it would be alone. Returns the number of groups.
int fuse_projections(mllama_model & m);

}  // namespace mllama
