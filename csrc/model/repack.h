// ggml's repacked weight layouts on the CPU (the "CPU_REPACK" extra buffer type): Q4_0, Q4_K and
// IQ4_NL matrices interleaved 8 rows at a time, which ggml's CPU kernels multiply faster than the
// file layout (figures in bench/README.md). Repacked weights live in anonymous memory, so the mmap
// pages they were copied from are released right after (no second copy stays resident).
// mllama_model_params.repack = 0 keeps every weight in the mapping.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct ggml_backend_buffer;
struct ggml_tensor;

namespace mllama {

class gguf_file;

// Where a repacked weight's original bytes are (the repacked buffer cannot be read back).
struct file_span {
    const gguf_file * file = nullptr;
    uint64_t offset = 0;
};

// The weights among `candidates` that ggml's CPU backend would multiply from a repacked buffer
// (none when !enabled or this ggml has no repacked layouts).
std::vector<ggml_tensor *> repackable(const std::vector<ggml_tensor *> & candidates, bool enabled);

// Allocate `weights` (from repackable) in one repack buffer and fill each from its span in the
// mapped file (ggml repacks while copying; n_threads copy at once), then drop those pages from
// this process. nullptr when weights is empty.
ggml_backend_buffer * load_repacked(const std::vector<ggml_tensor *> & weights,
                                    const std::map<std::string, file_span> & spans, int n_threads);

}  // namespace mllama
