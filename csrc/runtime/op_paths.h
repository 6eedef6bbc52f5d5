// Which path each family of ops takes in a context on this machine: our CPU kernels, ggml's CPU
// ops (with the SIMD the loaded ggml was built for), or the compute device. For `mllama info`.
#pragma once

#include <string>

struct mllama_context;

namespace mllama {

// One "family: path" line per op family.
std::string op_paths(const mllama_context & c);

}  // namespace mllama
