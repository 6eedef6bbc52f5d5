// The mutable side of a model: backends, the scheduler, and the image slots that hold each
// image's cross-attention K/V (computed once per image, read by the decoder). Not thread-safe:
// one caller at a time (the Python layer serializes).
#pragma once

#include "common/log.h"
#include "debug/dump.h"
#include "debug/profile.h"
#include "kernels/dispatch.h"
#include "mllama.h"
#include "runtime/batch.h"

#include "ggml.h"

#include <cstdint>
#include <memory>
#include <unordered_set>
#include <vector>

struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_backend_sched;
struct ggml_context;
struct ggml_tensor;
struct mllama_model;

namespace mllama {

struct encode_job;

// The context defaults: mllama_context_default_params and new_context's resolution of values <= 0.
inline constexpr int32_t k_default_n_ctx_max = 4096;  // n_ctx <= 0: min(trained context, this)
inline constexpr int32_t k_default_n_batch = 512;
inline constexpr int32_t k_default_n_image_slots = 4;
inline constexpr int32_t k_max_image_slots = 256;
inline constexpr int32_t k_max_seqs = 256;

struct image_slot {
    bool used = false;
    int32_t n_tiles = 0;
    int32_t aspect_ratio_id = 0;
};

// Persistent tensors of a context, each on the device of its layer.
struct context_state {
    // Per cross-attention layer: the K (after k_norm) and V of every slot, slot after slot, so the images of a
    // sequence (slots 0..n-1) are one view (graph/cross_kv.h's slot_view, [head_dim, n_head_kv, n_slots * n_vis]):
    // key-major, [head_dim, n_head_kv, n_slots * n_vis], or where cross_head_major, [head_dim, n_slots * n_vis,
    // n_head_kv] (a head's keys adjacent: where our cross-attention kernel reads them faster so).
    std::vector<ggml_tensor *> cross_k, cross_v;
    bool cross_head_major = false;
    // Per decoder layer (nullptr for cross-attention layers): [head_dim, n_head_kv, n_ctx * n_seq_max], or where
    // self_head_major, [head_dim, n_ctx * n_seq_max, n_head_kv] (graph/ops.h's cache_rows reads either);
    // sequence s in cells s * n_ctx .. (s + 1) * n_ctx - 1, position p in cell s * n_ctx + p.
    std::vector<ggml_tensor *> self_k, self_v;
    bool self_head_major = false;
    ggml_tensor * rope_factors = nullptr;  // [head_dim / 2] llama3 frequency factors, or nullptr
    int64_t n_vis = 0;                     // vision tokens per image: max_tiles * n_positions
};

}  // namespace mllama

struct mllama_context {
    const mllama_model * model = nullptr;
    mllama_context_params params{};           // resolved; the caller's strings are not kept (NULL here)
    mllama::logger log;
    mllama::cpu_kernel_set kernels;           // the CPU kernels of ours this context may use

    std::vector<ggml_backend *> backends;     // the other devices in use (vision, text layers), in model order
    ggml_backend * backend_cpu = nullptr;     // always (the scheduler's last backend)
    ggml_backend_sched * sched = nullptr;
    std::vector<uint8_t> graph_meta;          // memory for graph descriptors (no data)

    std::vector<ggml_context *> state_ctxs;   // the persistent tensors, one context and buffer per device
    std::vector<ggml_backend_buffer *> state_buffers;
    mllama::context_state state;
    std::vector<mllama::image_slot> slots;
    std::vector<int32_t> seq_length;          // positions each sequence's cache holds
    size_t max_nodes = 0;                     // graph capacity (grows with n_seq_max: up to one attention per sequence)
    int64_t n_decoded = 0;                    // tokens evaluated by the decoder (a counter for callers)
    std::unique_ptr<mllama::tensor_dumper> dumper;
    std::unique_ptr<mllama::op_profiler> profiler;
    std::unordered_set<const ggml_tensor *> populated;  // mapped weights whose pages are in (compute.cpp)
    std::unique_ptr<mllama::encode_job> encode_job;     // an image encode in steps under way (encode_steps.h)

    mllama_context() = default;
    ~mllama_context();
    mllama_context(const mllama_context &) = delete;
    mllama_context & operator=(const mllama_context &) = delete;
};

namespace mllama {

mllama_context_params default_context_params();

// The type of the caches a context makes with kv_f32 / cross_kv_f32 = requested (1 F32, 0 F16, -1 auto: F32 for a
// model whose output matrix is F32, else F16).
ggml_type cache_type(const mllama_model & model, int32_t requested);

std::unique_ptr<mllama_context> new_context(const mllama_model & model, const mllama_context_params & params);

// The CPU kernels text layer il's ops may use: none unless the layer computes on the CPU (the per-layer rule);
// il == n_layer: the output matrix (the last entry of the plan). The decoder's graphs and the image caches' layout
// (context.cpp) both follow it.
cpu_kernel_set layer_kernels(const mllama_context & ctx, size_t il);

// What the context holds beside the weights (see mllama_context_get_memory).
mllama_context_memory context_memory(const mllama_context & ctx);

// encode.cpp: run the vision encoder and the cross K/V graph on one image into `slot`.
void encode_image(mllama_context & ctx, int32_t slot, const float * pixels, int64_t n_pixels, int32_t aspect_ratio_id,
                  int32_t n_tiles, float * features, int64_t n_features);
void read_cross_kv(const mllama_context & ctx, int32_t slot, int32_t cross_index, float * k, float * v, int64_t n);

// decode.cpp: evaluate a batch (tokens of parts in order); the logits of out_rows (indices in the
// batch) go to `logits` (n_out x n_vocab).
void decode(mllama_context & ctx, const int32_t * tokens, const std::vector<batch_part> & parts, const int32_t * out_rows,
            int32_t n_out, float * logits);
std::vector<batch_part> batch_parts(const mllama_context & ctx, const mllama_batch_seq * seqs, int32_t n_seqs);

// sequences.cpp: per-sequence cache bookkeeping.
int32_t seq_length(const mllama_context & ctx, int32_t seq);
void seq_trim(mllama_context & ctx, int32_t seq, int32_t n_keep);
void seq_copy(mllama_context & ctx, int32_t src, int32_t dst, int32_t n_tokens);

}  // namespace mllama
