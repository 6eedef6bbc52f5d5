// The conventions a model file was written with, detected from the file itself, and how the loader
// undoes them so the runtime always computes with the raw Hugging Face parameters.
//  - mllama: this project's converter (raw HF parameters).
//  - ollama: Ollama 0.7.1+ single file: gates stored as tanh(g) (the position gate
//    as 1 - tanh(g)), self-attention q/k rows RoPE-permuted (GGML order), cross-attention q/k rows
//    permuted while q_norm/k_norm were not, no preprocessor constants.
//  - ollama_split: Ollama 0.4-0.6 text file + projector file; as above, and in the projector
//    ln1/ln2/attn_out names and ffn_down holding fc1, ffn_up fc2.
#pragma once

#include "mllama.h"

#include <string>
#include <vector>

namespace mllama {

class gguf_file;

struct conventions {
    mllama_file_format format = MLLAMA_FORMAT_MLLAMA;
    bool gates_pretanh = false;        // undone: tanh is not applied again; position gate = 1 - stored
    bool rope_permuted = false;        // undone: RoPE in normal (GPT-J) mode instead of NEOX
    bool cross_qk_permuted = false;    // undone: q_norm/k_norm permuted the same way at load
    bool fc_swapped = false;           // undone: names swapped back at load
    bool projector_names = false;      // era A names (ln1, ln2, attn_out)
    bool default_preprocessor = false; // CLIP mean/std and the standard aspect ratios assumed

    std::string describe() const;  // what was detected and undone, for `mllama info`
};

// Detect from the files (the first holds the text model; a second one, if any, the projector).
conventions detect_conventions(const std::vector<const gguf_file *> & files);

// The name a canonical tensor has in a file written with these conventions.
std::string file_tensor_name(const conventions & conv, const std::string & canonical);

// Permute a per-head vector the way llama.cpp's HF->GGUF RoPE permute reorders q/k rows:
// out[2 * b + a] = in[a * head_dim / 2 + b].
std::vector<float> rope_permute_head(const std::vector<float> & in);

}  // namespace mllama
