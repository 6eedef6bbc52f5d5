// An image encode in steps: the vision tower a few stages at a time, its state kept between the steps on
// the vision device, so that decode batches can run between them (a server's streams go on while a new
// image is encoded: python/mllama/generation/scheduler.py). The result equals encode_image's, bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

struct ggml_backend_buffer;
struct ggml_cgraph;
struct ggml_context;
struct ggml_tensor;
struct mllama_context;

namespace mllama {

struct cross_kv;
struct vision_options;

// The tower's state between two steps.
struct encode_job {
    int32_t slot = -1, aspect_ratio_id = 0, n_tiles = 0;
    int next_stage = 0, n_stages = 0;        // the tower's stages (graph/vision.h), the projector, each cross layer's
    std::vector<float> pixels;               // the input, until stage 0 has run
    ggml_context * ctx = nullptr;            // the descriptors of the tensors below
    ggml_backend_buffer * buffer = nullptr;  // on the vision device
    ggml_tensor * hidden = nullptr;          // [D, N] F32: the hidden state after the stages run so far
    std::vector<ggml_tensor *> inter;        // [D, N] F32: each intermediate layer's input, once reached
    ggml_tensor * mask = nullptr;            // [N, N] F16: the attention mask of every layer
    ggml_tensor * projected = nullptr;       // [n_embd, n_tiles * P] F32: the projector's output

    encode_job() = default;
    ~encode_job();
    encode_job(const encode_job &) = delete;
    encode_job & operator=(const encode_job &) = delete;
};

// Starts an encode in steps into `slot` (an unfinished one is dropped; the slot holds no image until the last
// step); returns its number of stages: the tower's, the projector's, then one per cross-attention layer (its K/V).
int32_t encode_begin(mllama_context & c, int32_t slot, const float * pixels, int64_t n_pixels,
                     int32_t aspect_ratio_id, int32_t n_tiles);

// Runs the next n_stages stages (<= 0: all that remain); returns how many are left (0: the slot holds the
// image). A failure drops the encode.
int32_t encode_step(mllama_context & c, int32_t n_stages);

// Drops the encode in steps under way, if any (slot >= 0: only one into that slot).
void drop_encode_job(mllama_context & c, int32_t slot = -1);

// encode.cpp, shared by both ways of encoding. check_image_args: the arguments, then whether the model has
// cross-attention layers to hold the image (MLLAMA_ERR_UNSUPPORTED).
void check_image_args(const mllama_context & c, int32_t slot, const float * pixels, int64_t n_pixels,
                      int32_t aspect_ratio_id, int32_t n_tiles, const float * features, int64_t n_features);
// Copies into the slot's rows of the caches the K/V of the cross-attention layers first_cross.. (cross_kv.h).
void expand_slot_kv(ggml_context * ctx, ggml_cgraph * gf, const mllama_context & c, const cross_kv & kv,
                    size_t first_cross, int32_t slot);
// After the graph of expand_slot_kv ran: the rows of missing tiles zeroed, the slot marked as holding the image.
void finish_slot(mllama_context & c, int32_t slot, int32_t aspect_ratio_id, int32_t n_tiles);

}  // namespace mllama
