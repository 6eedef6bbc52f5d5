#include "model/hparams.h"

#include "common/error.h"
#include "gguf/gguf_meta.h"

#include <algorithm>

namespace mllama {

bool text_hparams::is_cross(int layer) const {
    return std::binary_search(cross_layers.begin(), cross_layers.end(), layer);
}

static void require_positive(int64_t value, kv key) {
    if (value <= 0) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' must be positive (got %lld)", key_name(key), (long long) value);
    }
}

static void require_range(int64_t value, int64_t lo, int64_t hi, kv key) {
    if (value < lo || value > hi) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' = %lld is outside [%lld, %lld]", key_name(key), (long long) value,
             (long long) lo, (long long) hi);
    }
}

// Limits far above any released model; they keep a corrupt file from asking for absurd buffers.
static constexpr int64_t k_max_dim = 1 << 20;
static constexpr int64_t k_max_layers = 4096;

static std::vector<int> layer_list(const gguf_meta & meta, kv key, int64_t n_layer) {
    std::vector<int> out;
    for (int64_t v : meta.get_int_array(key)) {
        require_range(v, 0, n_layer - 1, key);
        out.push_back(static_cast<int>(v));
    }
    std::sort(out.begin(), out.end());
    if (std::adjacent_find(out.begin(), out.end()) != out.end()) {
        fail(MLLAMA_ERR_MODEL, "metadata key '%s' repeats a layer", key_name(key));
    }
    return out;
}

const image_defaults & reference_image_defaults() {
    // ref: transformers 5.23.0 image_processing_mllama.py (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    static const image_defaults clip = {{0.48145466f, 0.4578275f, 0.40821073f},
                                        {0.26862954f, 0.26130258f, 0.27577711f}};
    return clip;
}

std::vector<std::pair<int, int>> reference_aspect_ratios(int64_t max_tiles) {
    std::vector<std::pair<int, int>> ratios;
    for (int64_t a = 1; a <= max_tiles; ++a) {
        for (int64_t b = 1; a * b <= max_tiles; ++b) ratios.emplace_back(static_cast<int>(a), static_cast<int>(b));
    }
    return ratios;
}

static text_hparams load_text(const gguf_meta & meta) {
    text_hparams t;
    t.n_vocab = meta.get_int(kv::VOCAB_SIZE);
    t.n_ctx_train = meta.get_int(kv::CONTEXT_LENGTH);
    t.n_embd = meta.get_int(kv::EMBEDDING_LENGTH);
    t.n_ff = meta.get_int(kv::FEED_FORWARD_LENGTH);
    t.n_layer = meta.get_int(kv::BLOCK_COUNT);
    t.n_head = meta.get_int(kv::HEAD_COUNT);
    t.n_head_kv = meta.get_int(kv::HEAD_COUNT_KV);
    require_range(t.n_vocab, 1, 1 << 24, kv::VOCAB_SIZE);
    require_range(t.n_ctx_train, 1, 1LL << 32, kv::CONTEXT_LENGTH);
    require_range(t.n_embd, 1, k_max_dim, kv::EMBEDDING_LENGTH);
    require_range(t.n_ff, 1, k_max_dim, kv::FEED_FORWARD_LENGTH);
    require_range(t.n_layer, 1, k_max_layers, kv::BLOCK_COUNT);
    require_range(t.n_head, 1, t.n_embd, kv::HEAD_COUNT);
    require_range(t.n_head_kv, 1, t.n_head, kv::HEAD_COUNT_KV);
    if (t.n_embd % t.n_head != 0) {
        fail(MLLAMA_ERR_MODEL, "embedding_length %lld is not a multiple of head_count %lld", (long long) t.n_embd,
             (long long) t.n_head);
    }
    if (t.n_head % t.n_head_kv != 0) {
        fail(MLLAMA_ERR_MODEL, "head_count %lld is not a multiple of head_count_kv %lld", (long long) t.n_head,
             (long long) t.n_head_kv);
    }
    t.n_embd_head = t.n_embd / t.n_head;
    const int64_t rope_dims = meta.get_int(kv::ROPE_DIMENSION_COUNT, t.n_embd_head);
    if (rope_dims != t.n_embd_head) {
        fail(MLLAMA_ERR_UNSUPPORTED, "rope.dimension_count %lld != head size %lld", (long long) rope_dims,
             (long long) t.n_embd_head);
    }
    t.rms_norm_eps = meta.get_float(kv::RMS_EPS);
    t.rope_freq_base = meta.get_float(kv::ROPE_FREQ_BASE);
    if (!(t.rms_norm_eps > 0.0f)) fail(MLLAMA_ERR_MODEL, "layer_norm_rms_epsilon must be positive");
    if (!(t.rope_freq_base > 0.0f)) fail(MLLAMA_ERR_MODEL, "rope.freq_base must be positive");
    const std::string scaling = meta.get_str(kv::ROPE_SCALING_TYPE, "none");
    if (scaling == "llama3") {
        t.rope_scaling = rope_scaling_type::llama3;
        t.rope_factor = meta.get_float(kv::ROPE_SCALING_FACTOR);
        t.rope_low_freq_factor = meta.get_float(kv::ROPE_SCALING_LOW_FREQ_FACTOR);
        t.rope_high_freq_factor = meta.get_float(kv::ROPE_SCALING_HIGH_FREQ_FACTOR);
        t.rope_orig_ctx = meta.get_int(kv::ROPE_SCALING_ORIG_CTX);
        require_positive(t.rope_orig_ctx, kv::ROPE_SCALING_ORIG_CTX);
        if (!(t.rope_factor > 0.0f) || !(t.rope_high_freq_factor > t.rope_low_freq_factor)) {
            fail(MLLAMA_ERR_MODEL, "invalid llama3 rope scaling factors");
        }
    } else if (scaling != "none" && scaling != "default") {
        fail(MLLAMA_ERR_UNSUPPORTED, "rope scaling type '%s' is not supported", scaling.c_str());
    }
    t.cross_layers = layer_list(meta, kv::CROSS_ATTENTION_LAYERS, t.n_layer);
    return t;
}

static vision_hparams load_vision(const gguf_meta & meta) {
    vision_hparams v;
    v.n_embd = meta.get_int(kv::V_EMBEDDING_LENGTH);
    v.n_ff = meta.get_int(kv::V_FEED_FORWARD_LENGTH);
    v.n_layer = meta.get_int(kv::V_BLOCK_COUNT);
    v.n_global_layer = meta.get_int(kv::V_GLOBAL_BLOCK_COUNT);
    v.n_head = meta.get_int(kv::V_HEAD_COUNT);
    v.image_size = meta.get_int(kv::V_IMAGE_SIZE);
    v.patch_size = meta.get_int(kv::V_PATCH_SIZE);
    v.n_channels = meta.get_int(kv::V_NUM_CHANNELS, 3);
    v.max_tiles = meta.get_int(kv::V_MAX_NUM_TILES);
    v.norm_eps = meta.get_float(kv::V_NORM_EPS);
    v.projection_dim = meta.get_int(kv::V_PROJECTION_DIM, meta.get_int(kv::EMBEDDING_LENGTH));
    require_range(v.n_embd, 1, k_max_dim, kv::V_EMBEDDING_LENGTH);
    require_range(v.n_ff, 1, k_max_dim, kv::V_FEED_FORWARD_LENGTH);
    require_range(v.n_layer, 1, k_max_layers, kv::V_BLOCK_COUNT);
    require_range(v.n_global_layer, 0, k_max_layers, kv::V_GLOBAL_BLOCK_COUNT);
    require_range(v.n_head, 1, v.n_embd, kv::V_HEAD_COUNT);
    require_range(v.patch_size, 1, 4096, kv::V_PATCH_SIZE);
    require_range(v.image_size, v.patch_size, 16384, kv::V_IMAGE_SIZE);
    require_range(v.n_channels, 1, 16, kv::V_NUM_CHANNELS);
    require_range(v.max_tiles, 1, k_max_tiles_limit, kv::V_MAX_NUM_TILES);
    require_range(v.projection_dim, 1, k_max_dim, kv::V_PROJECTION_DIM);
    if (v.n_embd % v.n_head != 0) fail(MLLAMA_ERR_MODEL, "vision embedding_length is not a multiple of its head_count");
    if (v.image_size % v.patch_size != 0) {
        fail(MLLAMA_ERR_MODEL, "vision image_size %lld is not a multiple of patch_size %lld", (long long) v.image_size,
             (long long) v.patch_size);
    }
    if (!(v.norm_eps > 0.0f)) fail(MLLAMA_ERR_MODEL, "vision layer_norm_epsilon must be positive");
    v.intermediate_layers = layer_list(meta, kv::V_INTERMEDIATE_LAYERS, v.n_layer);

    std::vector<int64_t> ratios;
    if (meta.has(kv::V_ASPECT_RATIOS)) {
        ratios = meta.get_int_array(kv::V_ASPECT_RATIOS);
    } else {
        for (const auto & [a, b] : reference_aspect_ratios(v.max_tiles)) ratios.insert(ratios.end(), {a, b});
    }
    if (ratios.empty() || ratios.size() % 2 != 0) {
        fail(MLLAMA_ERR_MODEL, "supported_aspect_ratios must hold (tiles_h, tiles_w) pairs");
    }
    for (size_t i = 0; i < ratios.size(); i += 2) {
        if (ratios[i] < 1 || ratios[i + 1] < 1 || ratios[i] * ratios[i + 1] > v.max_tiles) {
            fail(MLLAMA_ERR_MODEL, "aspect ratio (%lld, %lld) does not fit max_num_tiles %lld", (long long) ratios[i],
                 (long long) ratios[i + 1], (long long) v.max_tiles);
        }
        v.aspect_ratios.emplace_back(static_cast<int>(ratios[i]), static_cast<int>(ratios[i + 1]));
    }
    const image_defaults & clip = reference_image_defaults();
    const std::vector<float> mean = meta.has(kv::V_IMAGE_MEAN) ? meta.get_float_array(kv::V_IMAGE_MEAN)
                                                               : std::vector<float>(clip.mean.begin(), clip.mean.end());
    const std::vector<float> std_ = meta.has(kv::V_IMAGE_STD) ? meta.get_float_array(kv::V_IMAGE_STD)
                                                              : std::vector<float>(clip.std.begin(), clip.std.end());
    if (mean.size() != 3 || std_.size() != 3) fail(MLLAMA_ERR_MODEL, "image_mean and image_std must have 3 values");
    for (int c = 0; c < 3; ++c) {
        if (!(std_[c] > 0.0f)) fail(MLLAMA_ERR_MODEL, "image_std must be positive");
        v.image_mean[c] = mean[c];
        v.image_std[c] = std_[c];
    }
    return v;
}

static token_ids load_token_ids(const gguf_meta & meta) {
    token_ids ids;
    ids.n_tokens = meta.has(kv::TOK_TOKENS) ? meta.array_size(kv::TOK_TOKENS) : 0;
    // Checked against the embedding rows once the token embedding tensor is known (model.cpp).
    auto read = [&](kv key) {
        const int64_t v = meta.get_int(key, -1);
        if (v < -1 || v >= (1 << 24)) {
            fail(MLLAMA_ERR_MODEL, "token id key '%s' = %lld is out of range", key_name(key), (long long) v);
        }
        return v;
    };
    auto read_or_find = [&](kv key, const char * text) { return meta.has(key) ? read(key) : meta.token_id(text); };
    ids.image = meta.has(kv::IMAGE_TOKEN_ID) ? read(kv::IMAGE_TOKEN_ID) : meta.token_id("<|image|>");
    if (ids.image < 0) ids.image = meta.get_int(kv::VOCAB_SIZE);  // <|image|> follows the text vocabulary
    ids.bos = read(kv::TOK_BOS_ID);
    ids.eos = read(kv::TOK_EOS_ID);
    ids.eot = read_or_find(kv::TOK_EOT_ID, "<|eot_id|>");
    ids.eom = read_or_find(kv::TOK_EOM_ID, "<|eom_id|>");
    ids.pad = read(kv::TOK_PAD_ID);
    return ids;
}

hparams load_hparams(const gguf_meta & meta) {
    hparams hp;
    hp.name = meta.get_str(kv::GENERAL_NAME, "");
    hp.text = load_text(meta);
    hp.vision = load_vision(meta);
    hp.tokens = load_token_ids(meta);
    if (hp.vision.projection_dim != hp.text.n_embd) {
        fail(MLLAMA_ERR_MODEL, "vision projection_dim %lld != text embedding_length %lld", (long long) hp.vision.projection_dim,
             (long long) hp.text.n_embd);
    }
    return hp;
}

static int32_t i32(int64_t v) { return static_cast<int32_t>(v); }

static void abi_text(const hparams & hp, mllama_hparams & h) {
    const text_hparams & t = hp.text;
    h.n_vocab = i32(t.n_vocab);
    h.n_vocab_embd = i32(t.n_vocab_embd);
    h.n_tokens = i32(hp.tokens.n_tokens);
    h.n_ctx_train = i32(std::min<int64_t>(t.n_ctx_train, INT32_MAX));
    h.n_embd = i32(t.n_embd);
    h.n_ff = i32(t.n_ff);
    h.n_layer = i32(t.n_layer);
    h.n_cross_layer = i32(static_cast<int64_t>(t.cross_layers.size()));
    h.n_head = i32(t.n_head);
    h.n_head_kv = i32(t.n_head_kv);
    h.n_embd_head = i32(t.n_embd_head);
    h.rms_norm_eps = t.rms_norm_eps;
    h.rope_freq_base = t.rope_freq_base;
    h.rope_scaling = static_cast<int32_t>(t.rope_scaling);
    h.rope_scaling_factor = t.rope_factor;
    h.rope_low_freq_factor = t.rope_low_freq_factor;
    h.rope_high_freq_factor = t.rope_high_freq_factor;
    h.rope_orig_ctx = i32(t.rope_orig_ctx);
    h.image_token_id = i32(hp.tokens.image);
    h.bos_token_id = i32(hp.tokens.bos);
    h.eos_token_id = i32(hp.tokens.eos);
    h.eot_token_id = i32(hp.tokens.eot);
    h.eom_token_id = i32(hp.tokens.eom);
    h.pad_token_id = i32(hp.tokens.pad);
}

static void abi_vision(const vision_hparams & v, mllama_hparams & h) {
    h.v_n_embd = i32(v.n_embd);
    h.v_n_ff = i32(v.n_ff);
    h.v_n_layer = i32(v.n_layer);
    h.v_n_global_layer = i32(v.n_global_layer);
    h.v_n_head = i32(v.n_head);
    h.v_n_intermediate = i32(static_cast<int64_t>(v.intermediate_layers.size()));
    h.v_image_size = i32(v.image_size);
    h.v_patch_size = i32(v.patch_size);
    h.v_n_channels = i32(v.n_channels);
    h.v_max_tiles = i32(v.max_tiles);
    h.v_n_patches = i32(v.n_patches());
    h.v_n_positions = i32(v.n_positions());
    h.v_n_aspect_ratios = i32(static_cast<int64_t>(v.aspect_ratios.size()));
    h.v_output_dim = i32(v.output_dim());
    h.v_norm_eps = v.norm_eps;
    for (int c = 0; c < 3; ++c) {
        h.image_mean[c] = v.image_mean[c];
        h.image_std[c] = v.image_std[c];
    }
    h.projection_dim = i32(v.projection_dim);
}

mllama_hparams abi_hparams(const hparams & hp) {
    mllama_hparams h{};
    abi_text(hp, h);
    abi_vision(hp.vision, h);
    return h;
}

}  // namespace mllama
