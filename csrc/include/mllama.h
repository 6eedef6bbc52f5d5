/* mllama: Llama 3.2 Vision on ggml. The ONLY public header: pure C, opaque handles, status codes.
 *
 * Conventions
 * - Every function that can fail returns mllama_status; on failure mllama_last_error() holds a
 *   readable reason (thread-local, valid until the next mllama call on the same thread).
 * - Handles are opaque; objects are created by mllama_<object>_load/_init and released by _free.
 * - Buffers are owned by the caller and passed with their capacity.
 * - Nothing here aborts the process on bad input: files, shapes and arguments are validated.
 *
 * The Python binding (cffi, API mode) reads the declarations between the two cdef markers below, so
 * that section holds plain declarations only (no macros other than integer constants).
 */
#ifndef MLLAMA_H
#define MLLAMA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MLLAMA_API __declspec(dllexport)
#else
#define MLLAMA_API __attribute__((visibility("default")))
#endif

/* cdef-begin */
#define MLLAMA_ABI_VERSION 4
#define MLLAMA_NAME_MAX 128
#define MLLAMA_TEXT_MAX 256

typedef enum mllama_status {
    MLLAMA_OK = 0,
    MLLAMA_ERR_INVALID_ARGUMENT = 1, /* a NULL handle, a bad size, an unknown name */
    MLLAMA_ERR_IO = 2,               /* the file cannot be opened, read or mapped */
    MLLAMA_ERR_FORMAT = 3,           /* not a GGUF, truncated, or not an mllama model */
    MLLAMA_ERR_MODEL = 4,            /* a tensor or key is missing or has the wrong shape/type */
    MLLAMA_ERR_UNSUPPORTED = 5,      /* valid, but not something this build can run */
    MLLAMA_ERR_OUT_OF_MEMORY = 6,
    MLLAMA_ERR_BACKEND = 7,          /* a ggml backend/device failed */
    MLLAMA_ERR_INTERNAL = 8
} mllama_status;

typedef enum mllama_log_level {
    MLLAMA_LOG_DEBUG = 0,
    MLLAMA_LOG_INFO = 1,
    MLLAMA_LOG_WARN = 2,
    MLLAMA_LOG_ERROR = 3
} mllama_log_level;

typedef enum mllama_device_type {
    MLLAMA_DEVICE_CPU = 0,
    MLLAMA_DEVICE_GPU = 1,
    MLLAMA_DEVICE_IGPU = 2,
    MLLAMA_DEVICE_ACCEL = 3
} mllama_device_type;

/* The conventions a GGUF file was written with (how its weights must be read). */
typedef enum mllama_file_format {
    MLLAMA_FORMAT_MLLAMA = 0,      /* this project's converter: raw Hugging Face parameters */
    MLLAMA_FORMAT_OLLAMA = 1,      /* Ollama 0.7.1+ single file */
    MLLAMA_FORMAT_OLLAMA_SPLIT = 2 /* Ollama 0.4-0.6 text file + projector file */
} mllama_file_format;

typedef struct mllama_model mllama_model;
typedef struct mllama_context mllama_context;

typedef void (*mllama_log_callback)(int32_t level, const char * text, void * user_data);

/* Defaults (mllama_model_default_params): n_threads 0, device NULL, n_gpu_layers -1, use_mmap 1, check_tensors 0,
 * log_level MLLAMA_LOG_WARN, no log callback, repack 1, rpc_servers/devices/tensor_split NULL, rpc_timeout_ms 0, rpc_io_timeout_s 0. */
typedef struct mllama_model_params {
    int32_t n_threads;         /* CPU threads for compute; <= 0: the number of physical cores */
    const char * device;       /* the vision tower's device, and the GPU the text layers go to unless `devices` is
                                  given: NULL, "" or "auto": the first local GPU if any, else the CPU; "cpu"; or a
                                  device name ("CUDA0", "RPC0", or an RPC endpoint "host:port") */
    int32_t n_gpu_layers;      /* text layers placed on the device list (the last ones); -1: all of them */
    int32_t use_mmap;          /* map the file instead of reading it (CPU weights only) */
    int32_t check_tensors;     /* scan weight data for NaN/Inf and invalid blocks while loading */
    int32_t log_level;         /* messages below this level are not delivered */
    mllama_log_callback log_callback; /* NULL: no logging */
    void * log_user_data;
    int32_t repack;            /* 1: quantized text matrices in the first of ggml's extra CPU layouts that takes each
                                  (CPU_REPACK for Q4_0/Q4_K/IQ4_NL; faster); 2: ggml's AMX int8 tiles first (a
                                  native build on an AMX CPU; a GCC 12 build of it dies of SIGILL: repack.h); 0:
                                  every weight stays in the file mapping */
    const char * rpc_servers;  /* NULL or "": none; else "host:port,host:port": ggml RPC workers (`mllama rpc-server`)
                                  whose devices join the device list (needs a ggml built with -DGGML_RPC=ON) */
    const char * devices;      /* the devices the text layers are split over, in order, as a comma list of names
                                  ("CUDA0,RPC0,CPU"); NULL or "": the local GPUs (see `device`), then the RPC devices;
                                  the CPU alone when there is none */
    const float * tensor_split; /* NULL: in proportion to each device's free memory; else n_tensor_split weights
                                  >= 0, one per device of the list */
    int32_t n_tensor_split;
    int32_t rpc_timeout_ms;    /* how long connecting to a worker may take; <= 0: 10000 */
    int32_t rpc_io_timeout_s;  /* how long one answer of a worker may take (a whole graph's compute on it) before the
                                  call fails and the model is lost (Linux); <= 0: 600 */
} mllama_model_params;

/* Defaults (mllama_context_default_params): n_ctx 0 (resolved to min(trained context, 4096)), n_batch 512,
 * n_threads 0 (the model's), n_image_slots 4, cross_kv_f32 and kv_f32 -1 (auto), every string NULL,
 * n_seq_max 1. */
typedef struct mllama_context_params {
    int32_t n_ctx;             /* tokens the self-attention cache holds per sequence; <= 0: min(trained context, 4096) */
    int32_t n_batch;           /* most tokens evaluated in one decode call; <= 0: 512 */
    int32_t n_threads;         /* <= 0: the model's */
    int32_t n_image_slots;     /* images whose cross-attention K/V can be held at once, 0 to 256 (default 4) */
    int32_t cross_kv_f32;      /* image slot precision: 1 F32, 0 F16, -1 auto (F32 for F32 models) */
    int32_t kv_f32;            /* self-attention cache precision, same values */
    const char * dump_dir;     /* NULL: no dumps; else write matching graph nodes as <name>.npy here */
    const char * dump_filter;  /* regex over node names (NULL or "": all named nodes) */
    const char * cpu_kernels;  /* NULL, "" or "1": every CPU kernel of ours this CPU can run; "0": none (ggml's ops
                                  only); or a comma list of "attn", "gemm", "gelu", "xattn", "qmm", "amx",
                                  "fuse" (q/k/v and gate/up as one product each where the model holds them so) */
    const char * profile_path; /* NULL or "": off; else per-op timings are written here as TSV when the context is
                                  freed (ignored while dump_dir is set) */
    int32_t n_seq_max;         /* sequences held at once, each with its own n_ctx cache cells, 1 to 256; <= 0: 1 */
} mllama_context_params;

typedef struct mllama_hparams {
    /* text decoder */
    int32_t n_vocab;           /* rows of the output projection (logits) */
    int32_t n_vocab_embd;      /* rows of the token embedding (n_vocab + extra learnable rows) */
    int32_t n_tokens;          /* tokenizer vocabulary size (0 when the file has no tokenizer) */
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_ff;
    int32_t n_layer;           /* all decoder layers, self- and cross-attention */
    int32_t n_cross_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_embd_head;
    float rms_norm_eps;
    float rope_freq_base;
    int32_t rope_scaling;      /* 0: none, 1: llama3 */
    float rope_scaling_factor;
    float rope_low_freq_factor;
    float rope_high_freq_factor;
    int32_t rope_orig_ctx;
    /* special tokens (-1 when absent) */
    int32_t image_token_id;
    int32_t bos_token_id;
    int32_t eos_token_id;
    int32_t eot_token_id;
    int32_t eom_token_id;
    int32_t pad_token_id;
    /* vision encoder */
    int32_t v_n_embd;
    int32_t v_n_ff;
    int32_t v_n_layer;         /* local layers */
    int32_t v_n_global_layer;
    int32_t v_n_head;
    int32_t v_n_intermediate;  /* number of intermediate layers concatenated into the output */
    int32_t v_image_size;      /* tile side in pixels */
    int32_t v_patch_size;
    int32_t v_n_channels;
    int32_t v_max_tiles;
    int32_t v_n_patches;       /* patches per tile */
    int32_t v_n_positions;     /* patches + CLS per tile */
    int32_t v_n_aspect_ratios;
    int32_t v_output_dim;      /* v_n_embd * (v_n_intermediate + 1) */
    float v_norm_eps;
    float image_mean[3];
    float image_std[3];
    int32_t projection_dim;    /* projector output = text n_embd */
} mllama_hparams;

typedef struct mllama_model_info {
    int32_t format;            /* mllama_file_format */
    uint64_t file_size;        /* bytes, all files together */
    uint64_t n_params;
    uint64_t n_bytes_weights;
    int64_t n_tensors;
    int32_t use_mmap;
    int32_t n_threads;
    int32_t n_gpu_layers;      /* text layers placed on devices other than the CPU */
    char device[MLLAMA_NAME_MAX];        /* the vision tower's device (mllama_model_get_placement: the rest) */
    char name[MLLAMA_TEXT_MAX];          /* general.name, if any */
    char conventions[1024];              /* the file format and the conventions undone at load */
    int32_t lost_worker;       /* 1 once an RPC worker holding part of the model failed: it must be loaded again */
} mllama_model_info;

typedef struct mllama_tensor_info {
    char name[MLLAMA_NAME_MAX];
    int32_t type;              /* ggml_type */
    int32_t n_dims;
    int64_t ne[4];             /* ggml order: ne[0] is the fastest dimension */
    uint64_t n_bytes;
    char buffer[MLLAMA_NAME_MAX];        /* where the data lives (buffer type name) */
} mllama_tensor_info;

/* Where one component of a model went (mllama_model_get_placement), and why. */
typedef struct mllama_placement {
    char component[32];        /* "vision" (tower + projector), "token_embd", "text" (a run of layers), "output" */
    int32_t first_layer;       /* text runs: the first layer; else -1 */
    int32_t n_layers;          /* text runs: layers in the run; else 0 */
    char device[MLLAMA_NAME_MAX];        /* ggml's device name: "CPU", "CUDA0", "RPC0" */
    char endpoint[MLLAMA_NAME_MAX];      /* RPC devices: the worker's host:port; else "" */
    uint64_t n_bytes;          /* weight bytes placed there */
    char reason[MLLAMA_TEXT_MAX];        /* why it went there */
} mllama_placement;

typedef struct mllama_device_info {
    char name[MLLAMA_NAME_MAX];
    char description[MLLAMA_TEXT_MAX];
    int32_t type;              /* mllama_device_type */
    uint64_t memory_free;
    uint64_t memory_total;
} mllama_device_info;

typedef struct mllama_type_info {
    char name[32];
    int64_t block_size;        /* elements per block */
    uint64_t type_size;        /* bytes per block */
    int32_t is_quantized;
    int32_t requires_imatrix;
    int32_t can_quantize;      /* this build can write it from F32 */
} mllama_type_info;

typedef struct mllama_image_defaults {
    float image_mean[3];
    float image_std[3];
} mllama_image_defaults;

typedef struct mllama_name_entry {
    const char * id;           /* stable identifier shared by C++ and Python, e.g. "TEXT_ATTN_Q" */
    const char * name;         /* GGUF key, or tensor name pattern with %d for the layer index */
    int32_t is_tensor;
} mllama_name_entry;

/* library */
MLLAMA_API uint32_t mllama_abi_version(void);
MLLAMA_API const char * mllama_version(void);
MLLAMA_API const char * mllama_last_error(void);
MLLAMA_API const char * mllama_status_name(mllama_status status);
MLLAMA_API mllama_status mllama_system_info(char * buf, size_t cap);

/* devices (ggml backend registry) */
MLLAMA_API int32_t mllama_device_count(void);
MLLAMA_API mllama_status mllama_device_get_info(int32_t index, mllama_device_info * out);

/* ggml RPC (the loaded ggml must be built with -DGGML_RPC=ON; else MLLAMA_ERR_UNSUPPORTED / 0) */
MLLAMA_API int32_t mllama_rpc_supported(void);
/* Serves `devices` (comma list of device names; NULL or "": the first GPU, else the CPU) to RPC clients at
 * endpoint "host:port" with n_threads CPU threads (<= 0: the physical cores) and ggml's tensor cache in cache_dir
 * (NULL: none). Blocks for the life of the process; returns only on an error (the port taken, a bad name). */
MLLAMA_API mllama_status mllama_rpc_serve(const char * endpoint, const char * devices, int32_t n_threads,
                                          const char * cache_dir);
/* The layer split arithmetic of model loading: device index per text layer (-1: the CPU) into out (n_layer values)
 * for the last n_offload layers (< 0: all) split in proportion to n_devices weights. */
MLLAMA_API mllama_status mllama_split_layers(int32_t n_layer, int32_t n_offload, const float * proportions,
                                             int32_t n_devices, int32_t * out);

/* GGUF names: the single table shared by the loader and the Python converter */
MLLAMA_API int32_t mllama_name_count(void);
MLLAMA_API mllama_status mllama_name_get(int32_t index, mllama_name_entry * out);

/* The reference preprocessor's constants (CLIP mean/std), assumed for files that lack them (Ollama's). */
MLLAMA_API void mllama_get_image_defaults(mllama_image_defaults * out);
/* The aspect ratios the reference supports for max_tiles, as (tiles_h, tiles_w) pairs flattened, in
   the reference order; returns the number of int32 values (2 per ratio) or -1 for max_tiles < 1 (or
   above 64, the most the loader accepts); copies up to cap. */
MLLAMA_API int32_t mllama_default_aspect_ratios(int32_t max_tiles, int32_t * buf, int32_t cap);

/* types and quantization (ggml's own quantizer) */
MLLAMA_API int32_t mllama_type_count(void);
MLLAMA_API mllama_status mllama_type_get_info(int32_t type, mllama_type_info * out);
MLLAMA_API mllama_status mllama_quantize(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row,
                                         void * dst, uint64_t dst_size, uint64_t * n_written);
MLLAMA_API mllama_status mllama_dequantize(int32_t type, const void * src, uint64_t src_size, float * dst,
                                           int64_t n_elements);

/* model: immutable weights and hyperparameters */
MLLAMA_API mllama_model_params mllama_model_default_params(void);
MLLAMA_API mllama_status mllama_model_load(const char * path, const char * projector_path,
                                           const mllama_model_params * params, mllama_model ** out_model);
MLLAMA_API void mllama_model_free(mllama_model * model);
MLLAMA_API mllama_status mllama_model_get_hparams(const mllama_model * model, mllama_hparams * out);
MLLAMA_API mllama_status mllama_model_get_info(const mllama_model * model, mllama_model_info * out);
/* Where the components went: returns the entry count (or -1 on error), copies up to cap entries. */
MLLAMA_API int32_t mllama_model_get_placement(const mllama_model * model, mllama_placement * out, int32_t cap);
/* Integer arrays of the hparams; each returns the element count (or -1 on error) and copies up to cap. */
MLLAMA_API int32_t mllama_model_cross_layers(const mllama_model * model, int32_t * buf, int32_t cap);
MLLAMA_API int32_t mllama_model_intermediate_layers(const mllama_model * model, int32_t * buf, int32_t cap);
MLLAMA_API int32_t mllama_model_aspect_ratios(const mllama_model * model, int32_t * buf, int32_t cap);
/* The element type of the caches a context makes with kv_f32 or cross_kv_f32 = precision (1: F32, 0: F16, -1: auto,
 * F32 for a model whose output matrix is F32, else F16), as ggml numbers types: 0 F32, 1 F16; -1 on error. */
MLLAMA_API int32_t mllama_model_cache_type(const mllama_model * model, int32_t precision);
/* Metadata by GGUF key. A string: copied NUL-terminated into buf (up to cap bytes), *len receives its
 * length; MLLAMA_ERR_INVALID_ARGUMENT when absent or not a string. A number (any numeric or bool
 * type) into *value. An integer array: the count is returned, up to cap values copied (-1: absent). */
MLLAMA_API mllama_status mllama_model_meta_string(const mllama_model * model, const char * key, char * buf, uint64_t cap,
                                                  uint64_t * len);
MLLAMA_API mllama_status mllama_model_meta_number(const mllama_model * model, const char * key, double * value);
MLLAMA_API int64_t mllama_model_meta_ints(const mllama_model * model, const char * key, int64_t * buf, int64_t cap);
/* The tokenizer vocabulary: every token NUL-terminated, back to back, into text (cap bytes; *len
 * receives the bytes needed), and the token types (llama.cpp's: 1 normal, 3 control, ...). */
MLLAMA_API mllama_status mllama_model_vocab(const mllama_model * model, char * text, uint64_t cap, uint64_t * len,
                                            int32_t * types, int64_t n_types);
MLLAMA_API int64_t mllama_model_tensor_count(const mllama_model * model);
MLLAMA_API mllama_status mllama_model_tensor_get_info(const mllama_model * model, int64_t index,
                                                      mllama_tensor_info * out);
/* Copy a weight out as float32 (dequantized); n_elements must equal the tensor's element count. */
MLLAMA_API mllama_status mllama_model_tensor_read_f32(const mllama_model * model, const char * name,
                                                      float * dst, int64_t n_elements);

/* context: the mutable state of a model (scheduler, image slots, caches) */
MLLAMA_API mllama_context_params mllama_context_default_params(void);
MLLAMA_API mllama_status mllama_context_init(const mllama_model * model, const mllama_context_params * params,
                                             mllama_context ** out_context);
MLLAMA_API void mllama_context_free(mllama_context * context);
/* The effective parameters (defaults resolved: n_ctx, n_batch, n_threads); the strings come back NULL. */
MLLAMA_API mllama_status mllama_context_get_params(const mllama_context * context, mllama_context_params * out);
/* Run the vision encoder on one preprocessed image (pixels: max_tiles x channels x tile x tile,
 * float32) and store its cross-attention K/V in `slot`. If `features` is not NULL it receives the
 * vision output, max_tiles x n_positions x v_output_dim float32 (n_features values). */
MLLAMA_API mllama_status mllama_context_encode_image(mllama_context * context, int32_t slot, const float * pixels,
                                                     int64_t n_pixels, int32_t aspect_ratio_id, int32_t n_tiles,
                                                     float * features, int64_t n_features);
/* Encoding an image in steps, so that decode batches can run between them (a server's streams go on while a new
 * image's vision tower runs). encode_begin checks the arguments as encode_image does, keeps the pixels and
 * writes the number of stages to *n_stages: the patch embedding, two per vision layer (its attention, its MLP;
 * local layers, then global), the projector, one per cross-attention layer (its K/V). Each encode_step runs the
 * next n_stages of them (<= 0: all that remain) and writes how many are left to *stages_left; at 0 the slot
 * holds the image, the same bits as after encode_image. Until then the slot holds no image (a decode that reads
 * it fails). Between steps the state kept takes (1 + n_intermediate) x v_n_embd x N float32, an N x N float16
 * mask (N = max_tiles x n_positions rounded up to 8) and the projector's output, n_embd x n_tiles x n_positions
 * float32, on the vision device, freed at the end. One encode in steps per context: a new encode_begin drops an
 * unfinished one, as do encode_image and set_slot_state into its slot, a failed step and encode_cancel. */
MLLAMA_API mllama_status mllama_context_encode_begin(mllama_context * context, int32_t slot, const float * pixels,
                                                     int64_t n_pixels, int32_t aspect_ratio_id, int32_t n_tiles,
                                                     int32_t * n_stages);
MLLAMA_API mllama_status mllama_context_encode_step(mllama_context * context, int32_t n_stages,
                                                    int32_t * stages_left);
MLLAMA_API mllama_status mllama_context_encode_cancel(mllama_context * context);
/* Copy the K (after k_norm) and V of cross-attention layer `cross_index` (0-based among the cross
 * layers) held in `slot`: each max_tiles * n_positions x n_head_kv x head_dim float32. */
MLLAMA_API mllama_status mllama_context_read_cross_kv(const mllama_context * context, int32_t slot, int32_t cross_index,
                                                      float * k, float * v, int64_t n);
/* Evaluate n_tokens of sequence 0 at positions n_past.. (as mllama_context_decode_batch with one part:
 * the sequence's images in slots 0..n_images-1, in prompt order). row_images (n_tokens x n_images
 * bytes) says which images each token's row attends to (all zero: none, so the cross-attention
 * layers add nothing to that row). Logits of the batch rows in out_rows are written to logits
 * (n_out x n_vocab float32). A row attends only to the tiles its image has. */
MLLAMA_API mllama_status mllama_context_decode(mllama_context * context, const int32_t * tokens, int32_t n_tokens,
                                               int32_t n_past, int32_t n_images, const uint8_t * row_images,
                                               const int32_t * out_rows, int32_t n_out, float * logits);
/* One sequence's part of a batch. Each sequence's cache holds its positions 0..length-1; a part
 * evaluates its tokens at positions n_past.. (n_past <= the sequence's length: cells from n_past on
 * are overwritten and the length becomes n_past + n_tokens). Its rows attend to the image slots it
 * names (any slots of the pool, shared between sequences as the caller likes). */
typedef struct mllama_batch_seq {
    int32_t seq_id;                /* 0 .. n_seq_max - 1, at most one part per sequence in a batch */
    int32_t n_past;                /* position of the part's first token */
    int32_t n_tokens;              /* the part's tokens: the next n_tokens of the batch, after the previous part's */
    int32_t n_images;              /* image slots the part's rows may attend to */
    const int32_t * image_slots;   /* n_images slot indices, in prompt order */
    const uint8_t * row_images;    /* n_tokens x n_images bytes: 1 where the token's row attends to image m */
} mllama_batch_seq;
/* Evaluate the tokens of several sequences in one pass (the weights are read once for all rows): the
 * parts in order cover tokens[0 .. sum of n_tokens), at most n_batch. out_rows index the whole batch;
 * their logits go to logits (n_out x n_vocab float32). A sequence's results do not depend on the
 * other parts of the batch. A batch its checks refuse (bad ids, sizes, n_past) changes nothing; an error while it
 * is evaluated cuts the lengths of the batch's sequences to their n_past. */
MLLAMA_API mllama_status mllama_context_decode_batch(mllama_context * context, const int32_t * tokens,
                                                     const mllama_batch_seq * seqs, int32_t n_seqs,
                                                     const int32_t * out_rows, int32_t n_out, float * logits);
/* Positions a sequence's cache holds (0 for a new or cleared sequence). */
MLLAMA_API mllama_status mllama_context_seq_length(const mllama_context * context, int32_t seq_id, int32_t * out);
/* Keep the first n_keep positions of a sequence (0: clear it); more than it holds changes nothing. */
MLLAMA_API mllama_status mllama_context_seq_trim(mllama_context * context, int32_t seq_id, int32_t n_keep);
/* Copy the first n_tokens positions of sequence src into dst (a shared prompt prefix): dst then holds
 * exactly those n_tokens positions. n_tokens <= src's length; src == dst is an error. */
MLLAMA_API mllama_status mllama_context_seq_copy(mllama_context * context, int32_t src, int32_t dst, int32_t n_tokens);
/* Which path each op family takes in this context on this machine, one "family: path" line each
 * (mllama's CPU kernels, ggml's CPU ops and their SIMD, or the compute device): copied NUL-terminated
 * into buf (up to cap bytes); *len receives the length. */
MLLAMA_API mllama_status mllama_context_op_paths(const mllama_context * context, char * buf, uint64_t cap, uint64_t * len);
/* Tokens evaluated by the decoder since the context was created. */
MLLAMA_API int64_t mllama_context_n_decoded(const mllama_context * context);
/* Bytes a context holds beside the weights: its caches (self-attention KV + image slots) and the
 * compute buffers the scheduler has reserved so far (they grow to the largest graph run). */
typedef struct mllama_context_memory {
    uint64_t kv_cache;         /* self-attention K/V of all decoder layers, n_ctx positions x n_seq_max */
    uint64_t image_slots;      /* cross-attention K/V of all image slots */
    uint64_t compute;          /* scheduler buffers, all backends */
} mllama_context_memory;
MLLAMA_API mllama_status mllama_context_get_memory(const mllama_context * context, mllama_context_memory * out);
/* Saving and restoring an image slot: the cross-attention K/V that encode_image left there (the tiles the
 * image has, every cross layer) and its tile count and aspect ratio id, as one blob with a header that
 * names the layout it was made for; a blob made for another layout is refused (MLLAMA_ERR_INVALID_ARGUMENT). */
typedef struct mllama_slot_state_info {
    uint32_t version;          /* the blob format's version */
    int32_t type;              /* ggml_type of the slot's K/V (F16 or F32) */
    int32_t n_cross_layer;
    int32_t n_head_kv;
    int32_t n_embd_head;
    int32_t n_positions;       /* vision tokens per tile */
    int32_t max_tiles;
    uint64_t max_size;         /* the largest blob: an image with max_tiles tiles */
} mllama_slot_state_info;
MLLAMA_API mllama_status mllama_context_slot_state_info(const mllama_context * context, mllama_slot_state_info * out);
/* The blob of what `slot` holds into dst (cap bytes; NULL: only the size); *len receives its size. */
MLLAMA_API mllama_status mllama_context_get_slot_state(const mllama_context * context, int32_t slot, void * dst,
                                                       uint64_t cap, uint64_t * len);
/* Fill `slot` from a blob of get_slot_state (size bytes, exactly the blob): the slot then holds that image. */
MLLAMA_API mllama_status mllama_context_set_slot_state(mllama_context * context, int32_t slot, const void * src,
                                                       uint64_t size);
/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* MLLAMA_H */
