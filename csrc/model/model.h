// The immutable model: hyperparameters, weights and the buffers that hold them. Everything mutable
// (caches, schedulers, image slots) belongs to a context created from it.
#pragma once

#include "common/log.h"
#include "gguf/conventions.h"
#include "gguf/gguf_file.h"
#include "mllama.h"
#include "model/devices.h"
#include "model/hparams.h"
#include "model/repack.h"
#include "model/weights.h"

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

struct ggml_backend_buffer;
struct ggml_backend_device;

struct mllama_model {
    mllama::logger log;
    mllama_model_params params{};  // as given, resolved (n_threads, use_mmap); device is not kept
    mllama::hparams hp;
    mllama::text_w text;
    mllama::vision_w vision;
    mllama_model_info info{};

    mllama::device_plan plan;                              // the devices of the vision tower, text layers, output
    std::vector<mllama_placement> placement;               // where everything went and why (report.cpp)
    mutable std::atomic<bool> lost_worker{false};          // an RPC worker failed: contexts refuse to run
    std::vector<std::unique_ptr<mllama::gguf_file>> files;  // the model file (and an Ollama projector file)
    mllama::conventions conv;                                // how the files were written
    std::vector<ggml_context *> contexts;                // tensor descriptors, one per buffer
    std::vector<ggml_backend_buffer *> buffers;          // weight data
    std::map<std::string, ggml_tensor *> tensors;        // every loaded weight by GGUF name
    std::map<std::string, mllama::file_span> repacked;   // weights in ggml's repacked CPU layout: their file bytes
    int n_fused = 0;                                     // matrix groups multiplied as one (fuse_projections)

    mllama_model() = default;
    ~mllama_model();
    mllama_model(const mllama_model &) = delete;
    mllama_model & operator=(const mllama_model &) = delete;
};

namespace mllama {

class gguf_meta;

mllama_model_params default_model_params();

std::unique_ptr<mllama_model> load_model(const char * path, const char * projector_path,
                                         const mllama_model_params & params);

// The metadata of the model's files (the text file first, then the projector file).
gguf_meta metadata(const mllama_model & m);

// A weight's bytes in its file type (from the file for repacked weights, which cannot be read back).
void read_weight(const mllama_model & m, const ggml_tensor * t, uint8_t * dst);
// The weight `name` dequantized to float32; n_elements must equal its element count.
void read_weight_f32(const mllama_model & m, const char * name, float * dst, int64_t n_elements);
// Name, type, shape and buffer of the index-th weight (in name order; index checked by the caller).
mllama_tensor_info tensor_info(const mllama_model & m, int64_t index);

}  // namespace mllama
