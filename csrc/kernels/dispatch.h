// CPU kernels of our own (kernels/x86/) for the places where ggml's generic CPU ops dominate (profile
// in bench/README.md): the vision tower's attention over all tiles of an image, the BF16 GEMMs of its
// linear layers and the exact GELU, the cross-attention of decoding, and the Q6_K text matrices and the
// Q4_K ones ggml repacked of decoding (a few rows at a time). All are ggml custom ops, so
// they run inside the normal graph on the CPU backend with ggml's threads. This is the one place that
// says which kernel may run: the CPU must have the features and the context's cpu_kernels allow it.
#pragma once

#include <cstdint>
#include <string>

// Built with the x86 kernels: CMake compiles kernels/x86/ only for x86-64 targets and says so here;
// without CMake (a syntax check) the compiler's target decides. Elsewhere every kernel reports
// unavailable and the graphs keep ggml's ops.
#ifndef MLLAMA_X86_KERNELS
#if defined(__x86_64__) || defined(_M_X64)
#define MLLAMA_X86_KERNELS 1
#else
#define MLLAMA_X86_KERNELS 0
#endif
#endif

struct ggml_context;
struct ggml_tensor;

namespace mllama {

// This build has the x86 kernels and the CPU has AVX-512 with BF16 dot products (and the OS saves
// its registers), and MLLAMA_AVX512 is not "0" (read at each use: "0" makes an AVX-512 CPU run the
// AVX2 kernels, for tests of that family on any x86 machine).
bool cpu_kernels_available();

// This build has the x86 kernels and the CPU has AVX2 with FMA and F16C.
bool avx2_kernels_available();

// The family of x86 kernels that runs here, one for every kernel: AVX-512 BF16 (AMX tiles on top where
// amx_tiles_available()), else AVX2 (only the kernels with an AVX2 form: attn, gemm, gelu, xattn and qmm), else none.
enum class cpu_family { none, avx2, avx512_bf16 };
cpu_family kernel_family();

// fuse is no kernel of its own: the text layers' q, k, v and gate, up multiplied as one matrix each where the
// model holds them fused (model/placement.h's fuse_projections), by whichever product takes that matrix.
enum class cpu_kernel : uint32_t { attn = 1, gemm = 2, gelu = 4, xattn = 8, qmm = 16, amx = 32, fuse = 64 };

// The CPU has what this kernel needs: qmm, the AVX2 family or the AVX-512 BF16 one with VNNI (int8 dot
// products); amx, amx_tiles_available(); attn, gemm, gelu and xattn, a kernel_family(); fuse, nothing (every
// CPU and build); the others, cpu_kernels_available().
bool cpu_kernel_available(cpu_kernel k);

// AMX tiles may run: an AVX-512 BF16 CPU with AMX-TILE and AMX-BF16 whose OS saves tile state and
// granted this process the tile data (Linux arch_prctl), or, on any AVX-512 BF16 CPU,
// MLLAMA_AMX_EMULATE=1: the tile kernels run on emulated tiles (kernels/x86/amx_tiles.h; slow, for
// tests of the AMX paths' logic on machines without AMX).
bool amx_tiles_available();
bool amx_tiles_hardware();  // the first case: real tiles (reported as AMX_TILE_KERNELS)
bool amx_tiles_emulated();  // MLLAMA_AMX_EMULATE=1 (the tile kernels use emulated tiles, AMX or not)

// Whether the Q4_K kernel's AVX-512 form prefetches its weights into L1 as well as into L2 for a product of n_rows
// rows: on Intel cores, where a one-row product took 0.89-0.94x the time with both (2-core Xeon with AMX, 2 threads:
// 4096 x 14336 at 16 GB/s on one core, the read probe's 15.6); on Zen 5 (AMD family 1Ah) up to 4 rows, where the
// full-size 11B's one-row decode step took 0.93x the time with both, 4 rows 0.985x, 8 rows alike and a 65-token
// prefill 1.02x; on no other x86 CPU (Zen 4: L2 only read at 40-46 GB/s against 35-39; bench/README.md).
// MLLAMA_PREFETCH_L1=0 or 1 says otherwise (read when a graph is built, for benches).
bool weights_prefetch_l1(int64_t n_rows);

// Whether the Q6_K kernel's AVX-512 form prefetches its weights into L1 as well as into L2 for a product of n_rows
// rows: on Zen 5 (AMD family 1Ah) for 3 to 6 rows only. There, the two taking turns in one process, the 11B-dims
// model's 1, 2, 7 and 8 streams (`bench/serving.py`; its Q6_K output matrix is ~45% of a step's bytes) ran at 1.06,
// 1.03, 1.06 and 1.05x the speed with L2 alone, 4 and 5 streams at 0.955 and 0.96x, 3 and 6 alike, and the full-size
// 11B's one-row decode step took 0.98x the time (bench/README.md). Elsewhere (Zen 4, Intel) into both, as measured
// before. MLLAMA_PREFETCH_L1 says otherwise, as for the Q4_K form.
bool q6k_weights_prefetch_l1(int64_t n_rows);

// The kernels a context allows (mllama_context_params.cpu_kernels, parsed once at init).
struct cpu_kernel_set {
    uint32_t bits = 0;
    // The kernel may run: allowed here and the CPU has the features.
    bool may_run(cpu_kernel k) const { return (bits & static_cast<uint32_t>(k)) && cpu_kernel_available(k); }
};

// The placement rule: our kernels are CPU ops (ggml custom ops, which no GPU backend runs), so a
// context that computes on another device uses none of them, whatever it allows; its graphs keep
// ggml's ops and stay on the device.
cpu_kernel_set kernels_for_compute(cpu_kernel_set allowed, bool compute_on_cpu);

// "attn", "gemm", "gelu", "xattn", "qmm", "amx" (the attn and gemm kernels, and prefill's Q4_K products, on AMX
// tiles), "fuse".
const char * cpu_kernel_name(cpu_kernel kernel);

// NULL, "" or "1": all; "0": none (ggml's ops only); otherwise a comma list of "attn", "gemm",
// "gelu", "xattn", "qmm", "amx", "fuse" (for A/B checks one kernel at a time). An unknown name fails with
// MLLAMA_ERR_INVALID_ARGUMENT naming it and the valid names.
cpu_kernel_set parse_cpu_kernels(const char * spec);

// -inf as F16 bits: where an additive attention mask hides a key from a row (the kernels skip such keys).
constexpr uint16_t k_f16_neg_inf = 0xFC00;

// Largest head size the attention kernel handles (larger heads use ggml's flash attention).
constexpr int64_t k_bf16_attn_max_head_dim = 128;

// softmax(Q K^T / sqrt(D) + mask) V with BF16 operands and F32 accumulation, flash-attention
// tiling (no score matrix in memory). q, k, v: [D, H, N] F32; mask: [N, N] F16 additive, one row
// per query; mask_rows: bf16_attention_mask_rows(mask), built once for all layers -> [D * H, N] F32.
// tiles: the two products on AMX tiles where amx_tiles_available() (kernels/x86/attn_amx.cpp).
ggml_tensor * bf16_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                             ggml_tensor * mask_rows, bool tiles);

// [N + Np / 64] I32: which rows of the [N, N] mask are all zeros (the attention adds no mask to those), then which
// 64-key blocks it hides from every other row (rows that all have a mask skip those: kernels/x86/attn_mask.h).
ggml_tensor * bf16_attention_mask_rows(ggml_context * ctx, ggml_tensor * mask);

// The BF16 GEMM below handles w (its layout and type, on this CPU).
bool bf16_linear_supported(const ggml_tensor * w);

// w x^T (+ bias, then exact GELU when gelu) with BF16 weights and F32 accumulation, near the CPU's
// peak (figures in bench/README.md). w: [K, M] BF16 with M % 16 == 0; x: [K, N] F32 or BF16; bias: [M]
// F32 or null -> [M, N]. AVX-512 BF16 family: x rounded to BF16 once, BF16 out when bf16_out (the input
// of a following bf16_linear), AMX tiles when tiles, amx_tiles_available() and K % 32 == 0
// (kernels/x86/gemm_amx.cpp). AVX2 family: x in F32, F32 out whatever bf16_out says.
ggml_tensor * bf16_linear(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias, bool gelu, bool bf16_out,
                          bool tiles);

// bf16_linear multiplies x in F32 (the AVX2 family), else in BF16: an input shared by several products
// is best converted to that type once.
bool bf16_linear_takes_f32();

// dequantize_bf16 takes w: a quantized type in the file layout that ggml converts to float, or Q4_K in ggml's
// repacked layout (CPU_REPACK); [K, M] with M % 16 == 0, in host memory, on a CPU with a kernel family.
bool dequantize_bf16_supported(const ggml_tensor * w);

// w [K, M] decoded as ggml decodes it and rounded to BF16, once per graph run, for bf16_linear: products over
// many rows (the cross-attention K and V of an image) run at the BF16 GEMM's speed, about twice ggml's quantized
// GEMM's. anchor: the product's input (the op's source, so that the scheduler places it with the product).
// kernels/x86/dequant_bf16.cpp. -> [K, M] BF16
ggml_tensor * dequantize_bf16(ggml_context * ctx, ggml_tensor * w, ggml_tensor * anchor);

// The layer norm ((x - mean) / sqrt(var + eps)) * w + b of each row of x [n, N] F32 (w, b: [n] F32; b may be
// null), in one pass per row, stored in the type bf16_linear multiplies (BF16, or F32 on the AVX2 family): for
// inputs of bf16_linear only, since the BF16 result is rounded. kernels/x86/layer_norm.cpp. -> [n, N]
ggml_tensor * layer_norm_for_linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps);

// Largest head size and query group (query heads per KV head) of cache_attention.
constexpr int64_t k_xattn_max_head_dim = 256;
constexpr int64_t k_xattn_max_group = 16;

bool cache_attention_supported(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v,
                               const ggml_tensor * mask);

// Whether cache_attention reads an F16 cache faster head-major (a head's keys adjacent) than key-major (a key's
// heads adjacent): its AVX2 form does (Zen 3, one decode row: a 4-tile image's cross-attention 1.6-1.7 against
// 2.0-2.4 ms a layer, the self-attention over 4K cached tokens 1.5-1.7 against 2.2-2.9); the AVX-512 form did not
// on an image cache (Zen 4: 1.65-2.3 against 1.4-1.6 ms; bench/README.md). Both the image and the self caches.
bool caches_head_major();

// softmax(q k^T scale + mask) v for a batch's tokens (decode and prefill) over a long F16 cache: the image's
// cross-attention keys (chunks of 8 tokens walk it together: 1.7-2.5x ggml's flash attention at 64-200 tokens
// on Zen 4) and the self-attention's KV caches (3.5x at 4K cached tokens on Zen 3, bench/README.md "Long
// contexts"); F32 accumulation, grouped query heads (query head i reads KV head i / (Hq / Hkv)). q: [D, Hq, T] F32;
// k, v: [D, Hkv, n_kv] F16 (views allowed), or [D, Hkv, n_kv, T]: token t over its own sequence's cache t; mask:
// [n_kv, >= T] F16 additive, one row per token -> [D * Hq, T] F32 (a token whose keys are all masked gets zeros).
// tiles: from k_xattn_tile_min_tokens tokens of one cache, with D % 32 == 0, the two products on AMX tiles where
// amx_tiles_available() (kernels/x86/xattn_amx.cpp: the query, the keys, the values and the probabilities rounded
// to BF16).
ggml_tensor * cache_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                              float scale, bool tiles);

// Fewest tokens whose cross-attention goes to AMX tiles (prefill; below, the tiles' query rows are mostly padding).
constexpr int64_t k_xattn_tile_min_tokens = 16;

// Most rows (tokens) q6k_matmul multiplies in one pass over the weights (larger batches: passes of up to this
// many rows, each over weights in L2), and the Q4_K kernel's AVX2 form's rows per pass.
constexpr int64_t k_qmm_max_rows = 8;

// q6k_matmul handles w [K, M] Q6_K (K % 256 == 0, contiguous, in host memory, not repacked) times
// x [K, N] F32 with N >= 1 contiguous rows, on this CPU.
bool q6k_matmul_supported(const ggml_tensor * w, const ggml_tensor * x);

// w x^T as ggml_mul_mat(w, x) computes it -> [M, N] F32: x quantized once to ggml's Q8_K values (8-bit
// blocks of 256), each weight block read once for all N rows, int8 dot products (VNNI; AVX2: vpmaddubsw),
// F32 sums per block.
ggml_tensor * q6k_matmul(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// Most rows (tokens) the Q4_K kernel's AVX-512 form takes in one pass over the weights: with them read once
// for all rows it also beats ggml's repacked product on prefills (64 rows: 1.5-2x on Zen 5; more rows go in
// passes: 1.83-1.99x at 65-512 rows on Zen 4); the AVX2 form goes in passes of k_qmm_max_rows (1.26-1.53x the
// AVX2 wheel's ggml at 16-200 rows; passes of 64 were no faster).
constexpr int64_t k_q4k_max_rows = 64;

// q4k_matmul handles w [K, M] Q4_K in ggml's repacked layout (its CPU_REPACK buffer: block_q4_Kx8, M % 8
// == 0) times x [K, N] F32 with N >= 1 contiguous rows, on this CPU (where qmm is available).
// q4k_max_rows(): the most rows of one pass over the weights.
int64_t q4k_max_rows();
bool q4k_matmul_supported(const ggml_tensor * w, const ggml_tensor * x);

// w x^T as ggml_mul_mat(w, x) computes it -> [M, N] F32: x quantized once to ggml's Q8_K values, each
// weight block read once for all N rows (kernels/x86/qmm_q4k_avx512.cpp, qmm_q4k_avx2.cpp).
ggml_tensor * q4k_matmul(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// Fewest rows (tokens) that take q4k_matmul_tiles: below, tiles are mostly padding and the decode of the weights
// to BF16 is shared by too few rows (measured: k_q6k_tiles_min_rows).
#ifndef MLLAMA_AMX_Q4K_MIN_ROWS
#define MLLAMA_AMX_Q4K_MIN_ROWS 32
#endif
constexpr int64_t k_q4k_tiles_min_rows = MLLAMA_AMX_Q4K_MIN_ROWS;

// Fewest rows that take a Q6_K matrix to q6k_matmul_tiles (below, our Q6_K kernel, which multiplies every batch):
// as for Q4_K. On the 2-core AMX Xeon of bench/README.md (2026-12-05, tests/c/qmm_q6k.cpp, an 11B ffn_down, 8 runs
// taking turns, least times) tiles and our Q6_K kernel took 9.7 and 9.6 ms at 32 rows, 11.8 and 15.1 at 48, 12.8 and
// 19.7 at 64; the Q4_K products ([4096 -> 14336]) 7.3 and 7.2 at 32 rows, 9.1 and 10.3 at 48.
constexpr int64_t k_q6k_tiles_min_rows = k_q4k_tiles_min_rows;

// Fewest rows that take a Q6_K matrix that q6k_matmul_tiles cannot multiply (M % 16 != 0) to the tile GEMM, decoded
// whole to BF16 and packed first. On the 2-core AMX Xeon of bench/README.md (2026-12-05) that fixed cost was
// ~94 ms for an 11B ffn_down [14336 -> 4096] (ggml's decoding 75 ms, the packing 19), against 25 ms for all of a
// 64-row prefill's product in our Q6_K kernel (0.39 ms a row; the tile GEMM ~0.2-0.33): the tiles win from ~500
// rows on. Other quantized types (no kernel of ours but ggml's product) keep k_q4k_tiles_min_rows.
constexpr int64_t k_q6k_decoded_min_rows = 512;

// Largest matrix, in BF16 bytes, that prefill multiplies on the tile GEMM (graph/decoder.cpp: BF16, and quantized
// types other than repacked Q4_K decoded whole, from k_q4k_tiles_min_rows rows): the copy and the GEMM's packed
// panels take up to twice that in the compute buffer. The 11B's ffn matrices take 112 MiB, the 90B's 448 MiB;
// never the output matrix (1-2 GiB).
constexpr int64_t k_prefill_decode_max_bytes = int64_t(512) << 20;

// q4k_matmul_tiles handles w (as q4k_matmul: Q4_K in ggml's repacked layout, M % 16 == 0 here) times x [K, N]
// F32 with N >= k_q4k_tiles_min_rows contiguous rows, where AMX tiles may run (the amx kernel).
bool q4k_tiles_supported(const ggml_tensor * w, const ggml_tensor * x);

// w x^T on AMX tiles -> [M, N] F32: the weights decoded to BF16 as ggml decodes them (once per call), x rounded
// to BF16, F32 sums (kernels/x86/qmm_q4k_amx.cpp). Prefill's products on CPUs with AMX-BF16.
ggml_tensor * q4k_matmul_tiles(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// q6k_matmul_tiles handles w (as q6k_matmul: Q6_K in the file layout, M % 16 == 0 here) times x [K, N] F32 with
// N >= k_q6k_tiles_min_rows contiguous rows, where AMX tiles may run (the amx kernel).
bool q6k_tiles_supported(const ggml_tensor * w, const ggml_tensor * x);

// w x^T on AMX tiles -> [M, N] F32: the weights decoded to BF16 as ggml decodes them (once per call), x rounded
// to BF16, F32 sums (kernels/x86/qmm_q6k_amx.cpp). Prefill's products on CPUs with AMX-BF16.
ggml_tensor * q6k_matmul_tiles(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// 0.5 x (1 + erf(x / sqrt(2))) elementwise on F32, vectorized (max abs error of erf 1.5e-7).
ggml_tensor * gelu_erf_fast(ggml_context * ctx, ggml_tensor * x);

}  // namespace mllama
