// Intel AMX tiles for the kernels (kernels/x86/gemm_amx.cpp): the CPU and OS check, the tile
// configuration, and the tile operations twice over: `hw_tiles` (the instructions) and
// `emulated_tiles` (the same operations in plain C++, with the shape rules the hardware enforces
// checked). A kernel is written once as a template over the tile type, so the logic of its AMX path
// (packing, blocking, edges, epilogue) runs and is tested on any AVX-512 BF16 machine
// (MLLAMA_AMX_EMULATE=1; the hardware check is in kernels/dispatch.cpp) and the hardware build differs only in these few lines.
#pragma once

#include "kernels/x86/simd_math.h"

#include <cstddef>
#include <cstdint>
#include <cstring>

#define MLLAMA_AMX_TARGET \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

namespace mllama::amx {

constexpr int k_tile_rows = 16;   // rows of a tile
constexpr int k_tile_bytes = 64;  // bytes of a tile row (16 F32, or 32 BF16 = 16 pairs)

// The 64-byte operand of ldtilecfg / sttilecfg (palette 1).
struct alignas(64) tile_config {
    uint8_t palette = 0;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
static_assert(sizeof(tile_config) == 64, "ldtilecfg reads 64 bytes");

// Every tile 16 rows x 64 bytes: the only shape the kernels use (a constant in read-only data: a
// configuration built on the stack for GCC's ldtilecfg intrinsic can lose its stores to the optimizer, see
// hw_tiles; llama.cpp PR #26954 reports ggml's own AMX kernels dying of SIGILL that way).
constexpr tile_config make_full_tiles() {
    tile_config c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) c.rows[t] = k_tile_rows, c.colsb[t] = k_tile_bytes;
    return c;
}
inline constexpr tile_config k_full_tiles = make_full_tiles();

// The instructions. Tile numbers are part of the instruction (GCC's intrinsics paste them into the
// assembly text), hence one literal call per tile number, chosen at compile time.
#define MLLAMA_TILE_SWITCH(T, CALL)                                                                     \
    if constexpr ((T) == 0) CALL(0);                                                                    \
    else if constexpr ((T) == 1) CALL(1);                                                               \
    else if constexpr ((T) == 2) CALL(2);                                                               \
    else if constexpr ((T) == 3) CALL(3);                                                               \
    else if constexpr ((T) == 4) CALL(4);                                                               \
    else if constexpr ((T) == 5) CALL(5);                                                               \
    else if constexpr ((T) == 6) CALL(6);                                                               \
    else CALL(7)

// GCC's intrinsics tell the compiler less than the instructions do: ldtilecfg / sttilecfg as reading and
// writing 8 bytes of the 64 (amxtileintrin.h, GCC 11-13), tileloadd / tilestored as touching no memory at
// all. So the configuration goes through asm with the whole struct as its operand, and a tile load or store
// is a compiler barrier: no store to what a tile loads stays behind it, no read of what a tile stored moves
// ahead of it (the emulated tiles, plain C++, cannot show such a reordering).
struct hw_tiles {
    static void store_config(tile_config * c) { __asm__ volatile("sttilecfg %0" : "=m"(*c)); }
    static void load_config(const tile_config * c) { __asm__ volatile("ldtilecfg %0" : : "m"(*c)); }
    MLLAMA_AMX_TARGET static void release() { _tile_release(); }
    template <int T> MLLAMA_AMX_TARGET static void zero() {
#define MLLAMA_TILE_ZERO(t) _tile_zero(t)
        MLLAMA_TILE_SWITCH(T, MLLAMA_TILE_ZERO);
#undef MLLAMA_TILE_ZERO
    }
    template <int T> MLLAMA_AMX_TARGET static void load(const void * p, size_t stride) {
        __asm__ volatile("" : : : "memory");
#define MLLAMA_TILE_LOAD(t) _tile_loadd(t, p, stride)
        MLLAMA_TILE_SWITCH(T, MLLAMA_TILE_LOAD);
#undef MLLAMA_TILE_LOAD
    }
    template <int T> MLLAMA_AMX_TARGET static void store(void * p, size_t stride) {
#define MLLAMA_TILE_STORE(t) _tile_stored(t, p, stride)
        MLLAMA_TILE_SWITCH(T, MLLAMA_TILE_STORE);
#undef MLLAMA_TILE_STORE
        __asm__ volatile("" : : : "memory");
    }
    // C += A B: A 16 rows x 16 BF16 pairs, B 16 pair rows x 16 columns (each a BF16 pair), C 16 x 16 F32.
    // The combinations the kernels use: GEMM C0..3 from A 4, 5 and B 6, 7; attention scores C0..3 from
    // A 4, 5 or 6 and B 7; attention P V, C0..5 from A 6 and B 7.
    template <int C, int A, int B> MLLAMA_AMX_TARGET static void dot_bf16() {
#define MLLAMA_TILE_DOT(c, a, b) else if constexpr (C == c && A == a && B == b) _tile_dpbf16ps(c, a, b);
        if constexpr (false) {}
        MLLAMA_TILE_DOT(0, 4, 6) MLLAMA_TILE_DOT(1, 4, 7) MLLAMA_TILE_DOT(2, 5, 6) MLLAMA_TILE_DOT(3, 5, 7)
        MLLAMA_TILE_DOT(0, 4, 7) MLLAMA_TILE_DOT(2, 4, 7) MLLAMA_TILE_DOT(3, 4, 7)
        MLLAMA_TILE_DOT(0, 5, 7) MLLAMA_TILE_DOT(1, 5, 7) MLLAMA_TILE_DOT(2, 5, 7)
        MLLAMA_TILE_DOT(0, 6, 7) MLLAMA_TILE_DOT(1, 6, 7) MLLAMA_TILE_DOT(2, 6, 7) MLLAMA_TILE_DOT(3, 6, 7)
        MLLAMA_TILE_DOT(4, 6, 7) MLLAMA_TILE_DOT(5, 6, 7)
        else static_assert(C < 0, "a tile combination not listed in hw_tiles::dot_bf16");
#undef MLLAMA_TILE_DOT
    }
};

// The same operations on a per-thread copy of the tile state. A shape the hardware would reject
// (no configuration, rows or bytes that do not match) traps, as the instruction would.
struct emulated_tiles {
    struct state {
        tile_config config;
        alignas(64) uint8_t data[8][k_tile_rows * k_tile_bytes];
    };
    static state & s() {
        static thread_local state st;
        return st;
    }
    static void require(bool ok) {
        if (!ok) __builtin_trap();
    }
    static void store_config(tile_config * c) { *c = s().config; }
    static void load_config(const tile_config * c) {
        s().config = *c;
        std::memset(s().data, 0, sizeof(s().data));
    }
    static void release() {
        s().config = tile_config{};
        std::memset(s().data, 0, sizeof(s().data));
    }
    template <int T> static void zero() {
        require(s().config.palette == 1);
        std::memset(s().data[T], 0, sizeof(s().data[T]));
    }
    template <int T> static void load(const void * p, size_t stride) {
        require(s().config.palette == 1);
        for (int r = 0; r < s().config.rows[T]; ++r) {
            std::memcpy(s().data[T] + r * k_tile_bytes, static_cast<const uint8_t *>(p) + r * stride, s().config.colsb[T]);
        }
    }
    template <int T> static void store(void * p, size_t stride) {
        require(s().config.palette == 1);
        for (int r = 0; r < s().config.rows[T]; ++r) {
            std::memcpy(static_cast<uint8_t *>(p) + r * stride, s().data[T] + r * k_tile_bytes, s().config.colsb[T]);
        }
    }
    static float bf16(const uint8_t * p) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    template <int C, int A, int B> static void dot_bf16() {
        const tile_config & c = s().config;
        require(c.palette == 1 && c.rows[C] == c.rows[A] && c.colsb[A] / 4 == c.rows[B] && c.colsb[B] == c.colsb[C]);
        for (int m = 0; m < c.rows[C]; ++m) {
            auto * acc = reinterpret_cast<float *>(s().data[C] + m * k_tile_bytes);
            for (int k = 0; k < c.colsb[A] / 4; ++k) {
                const uint8_t * a = s().data[A] + m * k_tile_bytes + 4 * k;
                for (int n = 0; n < c.colsb[C] / 4; ++n) {
                    const uint8_t * b = s().data[B] + k * k_tile_bytes + 4 * n;
                    acc[n] = __builtin_fmaf(bf16(a), bf16(b), acc[n]);
                    acc[n] = __builtin_fmaf(bf16(a + 2), bf16(b + 2), acc[n]);
                }
            }
        }
    }
};

// Runs a kernel's tile section: saves the thread's tile configuration (ggml's AMX kernels configure a
// thread once and rely on it), loads ours, and restores the saved one on the way out.
template <class Tiles>
class tile_scope {
public:
    explicit tile_scope(const tile_config & ours) {
        Tiles::store_config(&saved_);
        Tiles::load_config(&ours);
    }
    ~tile_scope() {
        if (saved_.palette) Tiles::load_config(&saved_);
        else Tiles::release();
    }
    tile_scope(const tile_scope &) = delete;
    tile_scope & operator=(const tile_scope &) = delete;

private:
    tile_config saved_;
};

}  // namespace mllama::amx
