// The immutable model: hyperparameters, weights and the buffers that hold them. Everything mutable
// (caches, schedulers, image slots) belongs to a context created from it.
#pragma once

#include "gguf/conventions.h"
#include "gguf/gguf_file.h"
#include "model/hparams.h"
#include "common/log.h"
#include "mllama.h"
#include "model/repack.h"
#include "model/weights.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

struct ggml_backend_buffer;
struct ggml_backend_device;

struct mllama_model {
    mllama::logger log;
    mllama_model_params params{};
    mllama::hparams hp;
    mllama::text_w text;
    mllama::vision_w vision;
    mllama_model_info info{};

    ggml_backend_device * compute_device = nullptr;  // where graphs run
    std::vector<std::unique_ptr<mllama::gguf_file>> files;  // the model file (and an Ollama projector file)
    mllama::conventions conv;                                // how the files were written
    std::vector<ggml_context *> contexts;                // tensor descriptors, one per buffer
    std::vector<ggml_backend_buffer *> buffers;          // weight data
    std::map<std::string, ggml_tensor *> tensors;        // every loaded weight by GGUF name
    std::map<std::string, mllama::file_span> repacked;   // weights in ggml's repacked CPU layout: their file bytes

    mllama_model() = default;
    ~mllama_model();
    mllama_model(const mllama_model &) = delete;
    mllama_model & operator=(const mllama_model &) = delete;
};

namespace mllama {

// A weight's bytes in its file type (from the file for repacked weights, which cannot be read back).
void read_weight(const mllama_model & m, const ggml_tensor * t, uint8_t * dst);

std::unique_ptr<mllama_model> load_model(const char * path, const char * projector_path, const mllama_model_params & params);

}  // namespace mllama
