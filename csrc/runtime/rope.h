// The llama3 RoPE frequency factors, for files that do not store them (rope_freqs.weight).
#pragma once

#include <vector>

namespace mllama {

struct text_hparams;

// [n_embd_head / 2] factors: ggml divides each rotation frequency by its factor.
std::vector<float> llama3_rope_factors(const text_hparams & t);

}  // namespace mllama
