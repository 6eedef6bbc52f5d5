// The rates a CPU's AMX tile unit and AVX-512 BF16 units reach here, on one thread and on all of them: the
// practical peak the AMX kernels' GFLOPS are read against (bench/amx_sweep.sh runs it; a virtual machine may
// give much less than the data sheet's 1024 BF16 FLOP per cycle and core).
//
//   cc -O2 -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16 -pthread bench/amx_peak.c -o amx_peak && ./amx_peak [threads]
//
// tmul: four C tiles from two A and two B tiles already loaded (tdpbf16ps alone); tmul_l1: each step loads its
// two A and two B tiles from 4 KiB (L1); tmul_l2: from 1 MiB per thread, walked in order (L2); dpbf16: eight
// independent vdpbf16ps chains (the only one where the CPU or OS has no AMX tiles). Prints GFLOPS:
// "<name>_1t=... <name>_<threads>t=..." ("<name>=none" for what cannot run here).
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { k_steps = 1 << 20, k_l2_bytes = 1 << 20 };

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// Every tile 16 rows x 64 bytes, in read-only data: GCC's _tile_loadconfig declares an 8-byte operand, so a
// configuration built on the stack can lose its shapes to the optimizer (kernels/x86/amx_tiles.h).
static const tile_config k_config __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

static void configure(void) { _tile_loadconfig(&k_config); }

#define FOUR_PRODUCTS() do { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); } while (0)
#define FOUR_LOADS(p) do { _tile_loadd(4, (p), 64); _tile_loadd(5, (p) + 1024, 64); _tile_loadd(6, (p) + 2048, 64); \
                           _tile_loadd(7, (p) + 3072, 64); } while (0)

// Returns the FLOPs done.
static double run(int kind, uint8_t * buf) {
    double flops = 0;
    if (kind < 3) {
        configure();
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        FOUR_LOADS(buf);
        for (long s = 0; s < k_steps; ++s) {
            if (kind > 0) {
                const uint8_t * p = buf + (kind == 1 ? 0 : (size_t)(s * 4096) % k_l2_bytes);
                FOUR_LOADS(p);
            }
            FOUR_PRODUCTS();
        }
        _tile_stored(0, buf, 64);
        _tile_release();
        flops = 4.0 * k_steps * 16 * 16 * 32 * 2;
    } else {
        // eight named accumulators (an array of them stayed in memory: a store and a load per product), each
        // starting elsewhere (equal ones were merged into one chain)
        __m512 c0 = _mm512_set1_ps(0), c1 = _mm512_set1_ps(1), c2 = _mm512_set1_ps(2), c3 = _mm512_set1_ps(3);
        __m512 c4 = _mm512_set1_ps(4), c5 = _mm512_set1_ps(5), c6 = _mm512_set1_ps(6), c7 = _mm512_set1_ps(7);
        const __m512bh a = (__m512bh)_mm512_loadu_si512(buf), b = (__m512bh)_mm512_loadu_si512(buf + 64);
        for (long s = 0; s < 8L * k_steps; ++s) {
            c0 = _mm512_dpbf16_ps(c0, a, b), c1 = _mm512_dpbf16_ps(c1, a, b), c2 = _mm512_dpbf16_ps(c2, a, b);
            c3 = _mm512_dpbf16_ps(c3, a, b), c4 = _mm512_dpbf16_ps(c4, a, b), c5 = _mm512_dpbf16_ps(c5, a, b);
            c6 = _mm512_dpbf16_ps(c6, a, b), c7 = _mm512_dpbf16_ps(c7, a, b);
        }
        c0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                           _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
        static volatile float sink;
        sink = _mm512_reduce_add_ps(c0);  // the sums are used: the loop stays
        (void)sink;
        flops = 8.0 * 8 * k_steps * 16 * 2 * 2;
    }
    return flops;
}

typedef struct { int kind; double flops; } job;

static void * worker(void * arg) {
    job * j = arg;
    uint8_t * buf = aligned_alloc(4096, k_l2_bytes + 4096);
    for (size_t i = 0; i < k_l2_bytes + 4096; ++i) buf[i] = (uint8_t)(i * 7 % 61);  // BF16 values: their size does not change the rates
    j->flops = run(j->kind, buf);
    free(buf);
    return NULL;
}

static double gflops(int kind, int threads) {
    pthread_t tid[256];
    job jobs[256];
    const double t0 = now();
    for (int i = 0; i < threads; ++i) jobs[i].kind = kind, pthread_create(&tid[i], NULL, worker, &jobs[i]);
    double flops = 0;
    for (int i = 0; i < threads; ++i) pthread_join(tid[i], NULL), flops += jobs[i].flops;
    return flops / (now() - t0) / 1e9;
}

int main(int argc, char ** argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    const int tiles = syscall(SYS_arch_prctl, 0x1023, 18) == 0;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    const char * names[] = {"tmul", "tmul_l1", "tmul_l2", "dpbf16"};
    for (int kind = 0; kind < 4; ++kind) {
        if (kind < 3 && !tiles) {  // no AMX tile data here (CPU or OS): the vector rate alone
            printf("%s=none ", names[kind]);
            continue;
        }
        printf("%s_1t=%.1f %s_%dt=%.1f ", names[kind], gflops(kind, 1), names[kind], threads,
               gflops(kind, threads > 256 ? 256 : threads));
        fflush(stdout);
    }
    printf("\n");
    return 0;
}
