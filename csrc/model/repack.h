// ggml's extra CPU buffer types: weight layouts its CPU backend multiplies faster than the file layout
// (figures in bench/README.md): "AMX" (int8 tiles, Intel CPUs with AMX, ggml built for them),
// "KleidiAI" (ARM) and "CPU_REPACK" (Q4_0, Q4_K, IQ4_NL interleaved 8 rows at a time). As llama.cpp
// does, each weight goes to the first type, in ggml's order of preference, whose mat-mul takes it; but
// "AMX" only when asked (mllama_model_params.repack = 2, MLLAMA_REPACK=amx): on the one AMX machine seen
// (bench/README.md, 2026-12-04) a native ggml build with the text matrices in that layout died of SIGILL
// in its first product. ggml configures a thread's tiles from a struct on the stack through GCC's
// ldtilecfg intrinsic, which tells the compiler it reads 8 of the 64 bytes: built with GCC 12, the stores
// of the tiles' shapes are gone (disassembly of ggml_backend_amx_mul_mat) and the next tile instruction
// faults (llama.cpp PR #26954).
// These weights live in anonymous memory, so the mmap pages they were copied from are released right
// after (no second copy stays resident). mllama_model_params.repack = 0 keeps every weight in the mapping.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

struct ggml_backend_buffer;
struct ggml_backend_buffer_type;
struct ggml_tensor;

namespace mllama {

class gguf_file;

// Where a repacked weight's original bytes are (a repacked buffer cannot be read back).
struct file_span {
    const gguf_file * file = nullptr;
    uint64_t offset = 0;
};

// A weight and the extra buffer type it goes to.
using repack_choice = std::pair<ggml_tensor *, ggml_backend_buffer_type *>;

// The weights among `candidates` that one of ggml's extra CPU buffer types multiplies, each with the
// first such type (mode: mllama_model_params.repack; none for 0 or when this ggml has no extra types).
std::vector<repack_choice> repack_plan(const std::vector<ggml_tensor *> & candidates, int mode);

// Allocate the weights of `plan` in one buffer per type and fill each from its span in the mapped file
// (ggml repacks while copying; n_threads copy at once), then drop those pages from this process.
std::vector<ggml_backend_buffer *> load_repacked(const std::vector<repack_choice> & plan,
                                                 const std::map<std::string, file_span> & spans, int n_threads);

// "CPU_REPACK 120, AMX 40": how many weights of the model each extra buffer type holds ("" for none).
std::string repack_summary(const std::map<std::string, ggml_tensor *> & tensors,
                           const std::map<std::string, file_span> & repacked);

}  // namespace mllama
