// Hyperparameters of the text decoder, the vision encoder and the tokenizer's special ids, read
// from GGUF metadata and validated. Every size in the runtime derives from these.
#pragma once

#include "mllama.h"

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mllama {

class gguf_meta;

enum class rope_scaling_type { none = 0, llama3 = 1 };

struct text_hparams {
    int64_t n_vocab = 0;       // logits rows (mllama.vocab_size)
    int64_t n_vocab_embd = 0;  // token embedding rows: read from the tensor, not the metadata
    int64_t n_ctx_train = 0;
    int64_t n_embd = 0;
    int64_t n_ff = 0;
    int64_t n_layer = 0;
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t n_embd_head = 0;
    float rms_norm_eps = 1e-5f;
    float rope_freq_base = 10000.0f;
    rope_scaling_type rope_scaling = rope_scaling_type::none;
    float rope_factor = 1.0f;
    float rope_low_freq_factor = 1.0f;
    float rope_high_freq_factor = 1.0f;
    int64_t rope_orig_ctx = 0;
    std::vector<int> cross_layers;  // sorted decoder indices of the cross-attention layers
    bool rope_neox = true;          // HF (rotate_half) order; false for files with RoPE-permuted q/k

    bool is_cross(int layer) const;
    int64_t n_embd_kv() const { return n_embd_head * n_head_kv; }
};

struct vision_hparams {
    int64_t n_embd = 0;
    int64_t n_ff = 0;
    int64_t n_layer = 0;
    int64_t n_global_layer = 0;
    int64_t n_head = 0;
    int64_t image_size = 0;
    int64_t patch_size = 0;
    int64_t n_channels = 0;
    int64_t max_tiles = 0;
    float norm_eps = 1e-5f;
    std::vector<int> intermediate_layers;
    std::vector<std::pair<int, int>> aspect_ratios;  // (tiles_h, tiles_w); id = index + 1
    std::array<float, 3> image_mean{};
    std::array<float, 3> image_std{};
    int64_t projection_dim = 0;

    int64_t n_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
    int64_t n_positions() const { return n_patches() + 1; }
    int64_t output_dim() const { return n_embd * (static_cast<int64_t>(intermediate_layers.size()) + 1); }
};

struct token_ids {
    int64_t n_tokens = 0;  // tokenizer vocabulary size, 0 when absent
    int64_t image = -1, bos = -1, eos = -1, eot = -1, eom = -1, pad = -1;
};

struct hparams {
    text_hparams text;
    vision_hparams vision;
    token_ids tokens;
    std::string name;
};

// The most tiles per image the loader accepts (far above any released model).
inline constexpr int64_t k_max_tiles_limit = 64;

// The reference preprocessor's constants (CLIP mean/std), assumed for files that lack them.
struct image_defaults {
    std::array<float, 3> mean, std;
};
const image_defaults & reference_image_defaults();

// The aspect ratios (tiles_h, tiles_w) the reference supports for max_tiles, in its order.
// ref: transformers 5.23.0 image_processing_mllama.py get_all_supported_aspect_ratios
std::vector<std::pair<int, int>> reference_aspect_ratios(int64_t max_tiles);

// Reads and validates everything but n_vocab_embd (taken from the token embedding tensor). Keys
// Ollama's files lack get the reference defaults: CLIP mean/std, the standard aspect ratios for
// max_num_tiles, projection_dim = n_embd, special ids looked up by their token text.
hparams load_hparams(const gguf_meta & meta);

// The hyperparameters as the C ABI reports them.
mllama_hparams abi_hparams(const hparams & hp);

}  // namespace mllama
