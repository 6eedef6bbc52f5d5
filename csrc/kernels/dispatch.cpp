// Which of our CPU kernels (kernels/dispatch.h) may run: the CPU's features and the context's choice.
#include "kernels/dispatch.h"

#include "common/error.h"
#include "common/text.h"

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if MLLAMA_X86_KERNELS
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace mllama {

#if MLLAMA_X86_KERNELS
static bool avx512_allowed() {  // read at each use (a test switches it within one process)
    const char * v = std::getenv("MLLAMA_AVX512");
    return !(v && std::strcmp(v, "0") == 0);
}

bool cpu_kernels_available() {
    static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                            __builtin_cpu_supports("avx512bf16");
    return cpu && avx512_allowed();
}

// CPUID.1:ECX bit 29 (clang's __builtin_cpu_supports knows no "f16c").
static bool cpu_has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}

bool avx2_kernels_available() {
    static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    return cpu;
}

cpu_family kernel_family() {
    if (cpu_kernels_available()) return cpu_family::avx512_bf16;
    return avx2_kernels_available() ? cpu_family::avx2 : cpu_family::none;
}

// CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE; XCR0 bits 17-18: the OS saves tile config and data.
static bool cpu_and_os_have_tiles() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv may run
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & (3u << 17)) == (3u << 17);
}

// Linux hands out the tile data (8 KiB of state per thread) only on request, once per process.
static bool tiles_granted() {
#if defined(__linux__)
    constexpr long k_arch_req_xcomp_perm = 0x1023, k_xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, k_arch_req_xcomp_perm, k_xfeature_xtiledata) == 0;
#else
    return false;
#endif
}

bool amx_tiles_hardware() {
    static const bool ready = cpu_kernels_available() && cpu_and_os_have_tiles() && tiles_granted();
    return ready;
}

bool amx_tiles_emulated() {  // read at each use (a test switches it within one process)
    const char * v = std::getenv("MLLAMA_AMX_EMULATE");
    return v && std::strcmp(v, "1") == 0;
}

bool amx_tiles_available() { return cpu_kernels_available() && (amx_tiles_emulated() || amx_tiles_hardware()); }

// The CPU's maker and, for AMD, its family (0x19: Zen 4, 0x1A: Zen 5), for the prefetch rules below.
struct cpu_maker {
    bool intel = false, amd = false;
    unsigned family = 0;
};

static cpu_maker this_cpu() {
    static const cpu_maker cpu = [] {
        cpu_maker m;
        unsigned a = 0, b = 0, c = 0, d = 0, vendor[3] = {0, 0, 0};
        if (!__get_cpuid(0, &a, &vendor[0], &vendor[2], &vendor[1])) return m;  // EBX, EDX, ECX: the name
        m.intel = std::memcmp(vendor, "GenuineIntel", sizeof(vendor)) == 0;
        m.amd = std::memcmp(vendor, "AuthenticAMD", sizeof(vendor)) == 0;
        if (m.amd && __get_cpuid(1, &a, &b, &c, &d)) {
            const unsigned base = (a >> 8) & 0xF;
            m.family = base == 0xF ? base + ((a >> 20) & 0xFF) : base;
        }
        return m;
    }();
    return cpu;
}

// MLLAMA_PREFETCH_L1=0 or 1 (read at each graph: a bench switches it between steps), else `by_cpu`.
static bool prefetch_l1_setting(bool by_cpu) {
    const char * v = std::getenv("MLLAMA_PREFETCH_L1");
    return v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0) ? v[0] == '1' : by_cpu;
}

bool weights_prefetch_l1(int64_t n_rows) {
    constexpr int64_t k_zen5_l1_rows = 4;  // (kernels/dispatch.h)
    const cpu_maker cpu = this_cpu();
    // the most rows a product prefetches into L1 for, by the CPU
    const int64_t l1_rows = cpu.intel ? std::numeric_limits<int64_t>::max()
                                      : (cpu.amd && cpu.family == 0x1A ? k_zen5_l1_rows : int64_t{0});
    return prefetch_l1_setting(n_rows <= l1_rows);
}

bool q6k_weights_prefetch_l1(int64_t n_rows) {
    constexpr int64_t k_zen5_l1_rows_min = 3, k_zen5_l1_rows_max = 6;  // (kernels/dispatch.h)
    const cpu_maker cpu = this_cpu();
    const bool zen5 = cpu.amd && cpu.family == 0x1A;
    return prefetch_l1_setting(!zen5 || (n_rows >= k_zen5_l1_rows_min && n_rows <= k_zen5_l1_rows_max));
}

bool cpu_kernel_available(cpu_kernel k) {
    static const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    switch (k) {
        case cpu_kernel::qmm:  // AVX-512 VNNI, or the AVX2 form (an AVX-512 BF16 CPU without VNNI: none)
            return kernel_family() == cpu_family::avx2 || (vnni && kernel_family() == cpu_family::avx512_bf16);
        case cpu_kernel::amx: return amx_tiles_available();
        case cpu_kernel::attn:
        case cpu_kernel::gemm:
        case cpu_kernel::gelu:
        case cpu_kernel::xattn: return kernel_family() != cpu_family::none;  // AVX-512 BF16 or AVX2
        case cpu_kernel::fuse: return true;
        default: return cpu_kernels_available();
    }
}

#else
bool cpu_kernels_available() { return false; }
bool avx2_kernels_available() { return false; }
cpu_family kernel_family() { return cpu_family::none; }
bool cpu_kernel_available(cpu_kernel k) { return k == cpu_kernel::fuse; }  // fuse: any CPU
bool amx_tiles_available() { return false; }
bool amx_tiles_hardware() { return false; }
bool amx_tiles_emulated() { return false; }
bool weights_prefetch_l1(int64_t) { return false; }
bool q6k_weights_prefetch_l1(int64_t) { return false; }

// The kernels' entry points, for the graphs to link on other processors: never reached, since no
// kernel may run where cpu_kernels_available() is false.
[[noreturn]] static void no_x86_kernels() {
    fail(MLLAMA_ERR_INTERNAL, "an x86 kernel was asked for in a build without them");
}
ggml_tensor * bf16_attention(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *,
                             bool) {
    no_x86_kernels();
}
ggml_tensor * bf16_attention_mask_rows(ggml_context *, ggml_tensor *) { no_x86_kernels(); }
bool bf16_linear_supported(const ggml_tensor *) { return false; }
bool bf16_linear_takes_f32() { no_x86_kernels(); }
bool dequantize_bf16_supported(const ggml_tensor *) { return false; }
ggml_tensor * dequantize_bf16(ggml_context *, ggml_tensor *, ggml_tensor *) { no_x86_kernels(); }
ggml_tensor * layer_norm_for_linear(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, float) { no_x86_kernels(); }
ggml_tensor * bf16_linear(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, bool, bool, bool) {
    no_x86_kernels();
}
bool cache_attention_supported(const ggml_tensor *, const ggml_tensor *, const ggml_tensor *, const ggml_tensor *) {
    return false;
}
ggml_tensor * cache_attention(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *, float, bool) {
    no_x86_kernels();
}
ggml_tensor * gelu_erf_fast(ggml_context *, ggml_tensor *) { no_x86_kernels(); }
bool q6k_matmul_supported(const ggml_tensor *, const ggml_tensor *) { return false; }
ggml_tensor * q6k_matmul(ggml_context *, ggml_tensor *, ggml_tensor *) { no_x86_kernels(); }
int64_t q4k_max_rows() { return 0; }
bool q4k_matmul_supported(const ggml_tensor *, const ggml_tensor *) { return false; }
ggml_tensor * q4k_matmul(ggml_context *, ggml_tensor *, ggml_tensor *) { no_x86_kernels(); }
bool q4k_tiles_supported(const ggml_tensor *, const ggml_tensor *) { return false; }
ggml_tensor * q4k_matmul_tiles(ggml_context *, ggml_tensor *, ggml_tensor *) { no_x86_kernels(); }
bool q6k_tiles_supported(const ggml_tensor *, const ggml_tensor *) { return false; }
ggml_tensor * q6k_matmul_tiles(ggml_context *, ggml_tensor *, ggml_tensor *) { no_x86_kernels(); }
#endif

static constexpr struct {
    const char * name;
    cpu_kernel kernel;
} k_kernel_names[] = {
    {"attn", cpu_kernel::attn}, {"gemm", cpu_kernel::gemm}, {"gelu", cpu_kernel::gelu}, {"xattn", cpu_kernel::xattn},
    {"qmm", cpu_kernel::qmm}, {"amx", cpu_kernel::amx}, {"fuse", cpu_kernel::fuse}};

cpu_kernel_set kernels_for_compute(cpu_kernel_set allowed, bool compute_on_cpu) {
    return compute_on_cpu ? allowed : cpu_kernel_set{};
}

bool caches_head_major() { return kernel_family() == cpu_family::avx2; }

const char * cpu_kernel_name(cpu_kernel kernel) {
    for (const auto & k : k_kernel_names) {
        if (k.kernel == kernel) return k.name;
    }
    return "?";
}

cpu_kernel_set parse_cpu_kernels(const char * spec) {
    cpu_kernel_set set;
    if (!spec || !*spec || std::strcmp(spec, "1") == 0) {
        for (const auto & k : k_kernel_names) set.bits |= static_cast<uint32_t>(k.kernel);
        return set;
    }
    if (std::strcmp(spec, "0") == 0) return set;
    const std::vector<std::string> entries = split_list(spec);
    if (entries.empty()) {  // ("," had been read as none)
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "cpu_kernels '%s' names no kernel (\"1\" all, \"0\" none)", spec);
    }
    for (const std::string & entry : entries) {
        bool known = false;
        for (const auto & k : k_kernel_names) {
            if (entry == k.name) set.bits |= static_cast<uint32_t>(k.kernel), known = true;
        }
        if (!known) {
            std::string valid;
            for (const auto & k : k_kernel_names) valid += (valid.empty() ? "" : ", ") + std::string(k.name);
            fail(MLLAMA_ERR_INVALID_ARGUMENT,
                 "unknown CPU kernel '%s' in cpu_kernels '%s' (valid: %s; \"1\" all, \"0\" none)", entry.c_str(),
                 spec, valid.c_str());
        }
    }
    return set;
}

}  // namespace mllama
