// The placement rule of our CPU kernels (csrc/kernels/dispatch.h), compiled with dispatch.cpp alone:
// a context computing on a GPU (any non-CPU device) gets no kernel, whatever it allows, so no custom
// CPU op is ever put in a graph the GPU backend runs; on the CPU the allowed set passes unchanged.
#include "kernels/dispatch.h"

#include <cstdio>

using namespace mllama;

static int failures = 0;

static void expect(bool ok, const char * what) {
    if (!ok) {
        std::printf("FAILED: %s\n", what);
        ++failures;
    }
}

int main() {
    const cpu_kernel all[] = {cpu_kernel::attn, cpu_kernel::gemm, cpu_kernel::gelu, cpu_kernel::xattn, cpu_kernel::qmm};
    const cpu_kernel_set allowed = parse_cpu_kernels(nullptr);
    const cpu_kernel_set on_gpu = kernels_for_compute(allowed, /*compute_on_cpu=*/false);
    const cpu_kernel_set on_cpu = kernels_for_compute(allowed, /*compute_on_cpu=*/true);
    expect(on_gpu.bits == 0, "a GPU context allows no kernel");
    expect(on_cpu.bits == allowed.bits && allowed.bits != 0, "a CPU context keeps every allowed kernel");
    for (cpu_kernel k : all) {
        const cpu_kernel_set named = kernels_for_compute(parse_cpu_kernels(cpu_kernel_name(k)), true);
        expect(!on_gpu.may_run(k), cpu_kernel_name(k));
        expect(on_cpu.may_run(k) == cpu_kernel_available(k), cpu_kernel_name(k));
        expect(named.may_run(k) == cpu_kernel_available(k), cpu_kernel_name(k));
    }
    const cpu_kernel_set some = kernels_for_compute(parse_cpu_kernels("attn,xattn"), true);
    expect(some.bits == (static_cast<uint32_t>(cpu_kernel::attn) | static_cast<uint32_t>(cpu_kernel::xattn)),
           "a list keeps exactly its kernels");
    expect(kernels_for_compute(parse_cpu_kernels("0"), true).bits == 0, "\"0\" keeps none");
    std::printf("%s (x86 kernels built: %d, available: %d)\n", failures ? "failed" : "ok", MLLAMA_X86_KERNELS,
                cpu_kernels_available() ? 1 : 0);
    return failures ? 1 : 0;
}
