// The mutable side of a model: backends, the scheduler, and the image slots that hold each
// image's cross-attention K/V (computed once per image, read by the decoder). Not thread-safe:
// one caller at a time (the Python layer serializes).
#pragma once

#include "debug.h"
#include "log.h"
#include "mllama.h"

#include <functional>
#include <memory>
#include <vector>

struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_backend_sched;
struct ggml_cgraph;
struct ggml_context;
struct ggml_tensor;
struct mllama_model;

namespace mllama {

struct image_slot {
    bool used = false;
    int32_t n_tiles = 0;
    int32_t aspect_ratio_id = 0;
    std::vector<ggml_tensor *> k, v;  // per cross layer: [head_dim, n_head_kv, max_tiles * n_positions]
};

}  // namespace mllama

struct mllama_context {
    const mllama_model * model = nullptr;
    mllama_context_params params{};
    mllama::logger log;

    ggml_backend * backend_device = nullptr;  // nullptr when computing on the CPU
    ggml_backend * backend_cpu = nullptr;
    ggml_backend_sched * sched = nullptr;
    std::vector<uint8_t> graph_meta;          // memory for graph descriptors (no data)

    ggml_context * slot_ctx = nullptr;
    ggml_backend_buffer * slot_buffer = nullptr;
    std::vector<mllama::image_slot> slots;
    std::unique_ptr<mllama::tensor_dumper> dumper;

    mllama_context() = default;
    ~mllama_context();
    mllama_context(const mllama_context &) = delete;
    mllama_context & operator=(const mllama_context &) = delete;
};

namespace mllama {

std::unique_ptr<mllama_context> new_context(const mllama_model & model, const mllama_context_params & params);

// Build a graph with `build` (which creates and returns its input tensors through captures),
// allocate it, let `feed` write the inputs, compute, then let `fetch` read the outputs.
void compute(mllama_context & ctx, const std::function<ggml_cgraph *(ggml_context *)> & build,
             const std::function<void()> & feed, const std::function<void()> & fetch);

void encode_image(mllama_context & ctx, int32_t slot, const float * pixels, int64_t n_pixels, int32_t aspect_ratio_id,
                  int32_t n_tiles, float * features, int64_t n_features);

void read_cross_kv(const mllama_context & ctx, int32_t slot, int32_t cross_index, float * k, float * v, int64_t n);

}  // namespace mllama
