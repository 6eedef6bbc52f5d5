// GGUF key and tensor names: the single source of truth, exported through the C ABI
// (mllama_name_get) so that the Python converter writes exactly what this loader reads.
#pragma once

#include <string>

namespace mllama {

// X-macro table: (ID, GGUF name). Tensor names take the layer index through %d.
#define MLLAMA_KEYS(X)                                                              \
    X(GENERAL_ARCHITECTURE, "general.architecture")                                 \
    X(GENERAL_NAME, "general.name")                                                 \
    X(GENERAL_FILE_TYPE, "general.file_type")                                       \
    X(WEIGHTS_CONVENTION, "mllama.weights.convention")                              \
    X(CONVERTER_VERSION, "mllama.converter.version")                                \
    X(VOCAB_SIZE, "mllama.vocab_size")                                              \
    X(CONTEXT_LENGTH, "mllama.context_length")                                      \
    X(EMBEDDING_LENGTH, "mllama.embedding_length")                                  \
    X(FEED_FORWARD_LENGTH, "mllama.feed_forward_length")                            \
    X(BLOCK_COUNT, "mllama.block_count")                                            \
    X(HEAD_COUNT, "mllama.attention.head_count")                                    \
    X(HEAD_COUNT_KV, "mllama.attention.head_count_kv")                              \
    X(RMS_EPS, "mllama.attention.layer_norm_rms_epsilon")                           \
    X(CROSS_ATTENTION_LAYERS, "mllama.attention.cross_attention_layers")            \
    X(ROPE_DIMENSION_COUNT, "mllama.rope.dimension_count")                          \
    X(ROPE_FREQ_BASE, "mllama.rope.freq_base")                                      \
    X(ROPE_SCALING_TYPE, "mllama.rope.scaling.type")                                \
    X(ROPE_SCALING_FACTOR, "mllama.rope.scaling.factor")                            \
    X(ROPE_SCALING_LOW_FREQ_FACTOR, "mllama.rope.scaling.low_freq_factor")          \
    X(ROPE_SCALING_HIGH_FREQ_FACTOR, "mllama.rope.scaling.high_freq_factor")        \
    X(ROPE_SCALING_ORIG_CTX, "mllama.rope.scaling.original_context_length")         \
    X(IMAGE_TOKEN_ID, "mllama.image_token_id")                                      \
    X(V_BLOCK_COUNT, "mllama.vision.block_count")                                   \
    X(V_GLOBAL_BLOCK_COUNT, "mllama.vision.global.block_count")                     \
    X(V_INTERMEDIATE_LAYERS, "mllama.vision.intermediate_layers_indices")           \
    X(V_EMBEDDING_LENGTH, "mllama.vision.embedding_length")                         \
    X(V_FEED_FORWARD_LENGTH, "mllama.vision.feed_forward_length")                   \
    X(V_HEAD_COUNT, "mllama.vision.attention.head_count")                           \
    X(V_NORM_EPS, "mllama.vision.attention.layer_norm_epsilon")                     \
    X(V_IMAGE_SIZE, "mllama.vision.image_size")                                     \
    X(V_PATCH_SIZE, "mllama.vision.patch_size")                                     \
    X(V_NUM_CHANNELS, "mllama.vision.num_channels")                                 \
    X(V_MAX_NUM_TILES, "mllama.vision.max_num_tiles")                               \
    X(V_ASPECT_RATIOS, "mllama.vision.supported_aspect_ratios")                     \
    X(V_IMAGE_MEAN, "mllama.vision.image_mean")                                     \
    X(V_IMAGE_STD, "mllama.vision.image_std")                                       \
    X(V_PROJECTION_DIM, "mllama.vision.projection_dim")                             \
    X(TOK_MODEL, "tokenizer.ggml.model")                                            \
    X(TOK_PRE, "tokenizer.ggml.pre")                                                \
    X(TOK_TOKENS, "tokenizer.ggml.tokens")                                          \
    X(TOK_TOKEN_TYPE, "tokenizer.ggml.token_type")                                  \
    X(TOK_MERGES, "tokenizer.ggml.merges")                                          \
    X(TOK_BOS_ID, "tokenizer.ggml.bos_token_id")                                    \
    X(TOK_EOS_ID, "tokenizer.ggml.eos_token_id")                                    \
    X(TOK_EOT_ID, "tokenizer.ggml.eot_token_id")                                    \
    X(TOK_EOM_ID, "tokenizer.ggml.eom_token_id")                                    \
    X(TOK_PAD_ID, "tokenizer.ggml.padding_token_id")                                \
    X(TOK_EOS_IDS, "tokenizer.ggml.eos_token_ids")                                  \
    X(TOK_ADD_BOS, "tokenizer.ggml.add_bos_token")                                  \
    X(TOK_CHAT_TEMPLATE, "tokenizer.chat_template")                                 \
    X(GEN_TEMPERATURE, "mllama.generation.temperature")                             \
    X(GEN_TOP_P, "mllama.generation.top_p")                                         \
    X(GEN_TOP_K, "mllama.generation.top_k")                                         \
    X(GEN_DO_SAMPLE, "mllama.generation.do_sample")

#define MLLAMA_TENSORS(X)                                                           \
    X(TOKEN_EMBD, "token_embd.weight")                                              \
    X(OUTPUT_NORM, "output_norm.weight")                                            \
    X(OUTPUT, "output.weight")                                                      \
    X(ROPE_FREQS, "rope_freqs.weight")                                              \
    X(ATTN_NORM, "blk.%d.attn_norm.weight")                                         \
    X(ATTN_Q, "blk.%d.attn_q.weight")                                               \
    X(ATTN_K, "blk.%d.attn_k.weight")                                               \
    X(ATTN_V, "blk.%d.attn_v.weight")                                               \
    X(ATTN_OUT, "blk.%d.attn_output.weight")                                        \
    X(FFN_NORM, "blk.%d.ffn_norm.weight")                                           \
    X(FFN_GATE, "blk.%d.ffn_gate.weight")                                           \
    X(FFN_UP, "blk.%d.ffn_up.weight")                                               \
    X(FFN_DOWN, "blk.%d.ffn_down.weight")                                           \
    X(CROSS_Q, "blk.%d.cross_attn_q_proj.weight")                                   \
    X(CROSS_K, "blk.%d.cross_attn_k_proj.weight")                                   \
    X(CROSS_V, "blk.%d.cross_attn_v_proj.weight")                                   \
    X(CROSS_O, "blk.%d.cross_attn_o_proj.weight")                                   \
    X(CROSS_Q_NORM, "blk.%d.cross_attn_q_norm.weight")                              \
    X(CROSS_K_NORM, "blk.%d.cross_attn_k_norm.weight")                              \
    X(CROSS_ATTN_GATE, "blk.%d.cross_attn_attn_gate")                               \
    X(CROSS_MLP_GATE, "blk.%d.cross_attn_mlp_gate")                                 \
    X(MM_W, "mm.0.weight")                                                          \
    X(MM_B, "mm.0.bias")                                                            \
    X(V_PATCH_EMBD, "v.patch_embd.weight")                                          \
    X(V_CLASS_EMBD, "v.class_embd")                                                 \
    X(V_POS_EMBD, "v.position_embd.weight")                                         \
    X(V_POS_GATE, "v.position_embd.gate")                                           \
    X(V_TILE_POS_EMBD, "v.tile_position_embd.weight")                               \
    X(V_TILE_POS_GATE, "v.tile_position_embd.gate")                                 \
    X(V_PRE_TILE_EMBD, "v.pre_tile_position_embd.weight")                           \
    X(V_PRE_TILE_GATE, "v.pre_tile_position_embd.gate")                             \
    X(V_POST_TILE_EMBD, "v.post_tile_position_embd.weight")                         \
    X(V_POST_TILE_GATE, "v.post_tile_position_embd.gate")                           \
    X(V_PRE_LN_W, "v.pre_ln.weight")                                                \
    X(V_PRE_LN_B, "v.pre_ln.bias")                                                  \
    X(V_POST_LN_W, "v.post_ln.weight")                                              \
    X(V_POST_LN_B, "v.post_ln.bias")                                                \
    X(V_ATTN_NORM_W, "v.blk.%d.attn_norm.weight")                                   \
    X(V_ATTN_NORM_B, "v.blk.%d.attn_norm.bias")                                     \
    X(V_ATTN_Q, "v.blk.%d.attn_q.weight")                                           \
    X(V_ATTN_K, "v.blk.%d.attn_k.weight")                                           \
    X(V_ATTN_V, "v.blk.%d.attn_v.weight")                                           \
    X(V_ATTN_OUT, "v.blk.%d.attn_output.weight")                                    \
    X(V_FFN_NORM_W, "v.blk.%d.ffn_norm.weight")                                     \
    X(V_FFN_NORM_B, "v.blk.%d.ffn_norm.bias")                                       \
    X(V_FFN_UP_W, "v.blk.%d.ffn_up.weight")                                         \
    X(V_FFN_UP_B, "v.blk.%d.ffn_up.bias")                                           \
    X(V_FFN_DOWN_W, "v.blk.%d.ffn_down.weight")                                     \
    X(V_FFN_DOWN_B, "v.blk.%d.ffn_down.bias")                                       \
    X(VG_ATTN_NORM_W, "v.global.blk.%d.attn_norm.weight")                           \
    X(VG_ATTN_NORM_B, "v.global.blk.%d.attn_norm.bias")                             \
    X(VG_ATTN_Q, "v.global.blk.%d.attn_q.weight")                                   \
    X(VG_ATTN_K, "v.global.blk.%d.attn_k.weight")                                   \
    X(VG_ATTN_V, "v.global.blk.%d.attn_v.weight")                                   \
    X(VG_ATTN_OUT, "v.global.blk.%d.attn_output.weight")                            \
    X(VG_FFN_NORM_W, "v.global.blk.%d.ffn_norm.weight")                             \
    X(VG_FFN_NORM_B, "v.global.blk.%d.ffn_norm.bias")                               \
    X(VG_FFN_UP_W, "v.global.blk.%d.ffn_up.weight")                                 \
    X(VG_FFN_UP_B, "v.global.blk.%d.ffn_up.bias")                                   \
    X(VG_FFN_DOWN_W, "v.global.blk.%d.ffn_down.weight")                             \
    X(VG_FFN_DOWN_B, "v.global.blk.%d.ffn_down.bias")                               \
    X(VG_ATTN_GATE, "v.global.blk.%d.attn_gate")                                    \
    X(VG_FFN_GATE, "v.global.blk.%d.ffn_gate")

#define MLLAMA_ENUM_ENTRY(id, name) id,
enum class kv { MLLAMA_KEYS(MLLAMA_ENUM_ENTRY) COUNT };
enum class tn { MLLAMA_TENSORS(MLLAMA_ENUM_ENTRY) COUNT };
#undef MLLAMA_ENUM_ENTRY

inline constexpr const char * k_arch_name = "mllama";
inline constexpr const char * k_weights_convention = "hf";  // raw HF parameters, no permutes, gates raw

const char * key_name(kv key);
std::string tensor_name(tn tensor, int layer = -1);

struct name_entry {
    const char * id;
    const char * name;
    bool is_tensor;
};
int name_count();
const name_entry & name_at(int index);

}  // namespace mllama
