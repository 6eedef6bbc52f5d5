#!/usr/bin/env bash
# The AMX kernels' tuning constants, timed on an AMX machine in one run, in this order: the tile unit's own rates
# (bench/amx_peak.c); the Q4_K product on tiles (kernels/x86/qmm_q4k_amx.cpp, tests/c/qmm_q4k.cpp with
# QMM_Q4K_TILES=1) against our VNNI kernel and ggml's product at prefill's row counts, the Q6_K one (qmm_q6k_amx.cpp,
# tests/c/qmm_q6k.cpp with QMM_Q6K_TILES=1) against our Q6_K kernel; the vision attention
# (tests/c/attn_bf16.cpp, the tower's shape: D 80, 16 heads, 4 x 1608 tokens) per step length (ATTN_STEPS, keys:
# MLLAMA_AMX_ATTN_STEP_KEYS), an earlier kernels/x86/attn_amx.cpp where OLD_ATTN names one, and once with its time
# split over the phases of a step (MLLAMA_AMX_ATTN_PHASES); the GEMM (tests/c/gemm_bf16.cpp, the tower's shapes)
# per token block (GEMM_BLOCKS, tokens: MLLAMA_AMX_GEMM_BLOCK_TOKENS); the last two at all the CPU's threads and at half
# of them (where the CPU runs two threads per core, the tile unit is shared). The GEMM driver checks its results
# against ggml within the summation bound first; the attention's and the Q4_K product's checks are
# tests/test_amx_kernels.py.
#
#   bash bench/amx_sweep.sh [OUT_FILE] [OLD_ATTN]     # ~2 minutes on a 16-core Xeon
set -u
out=${1:-/dev/stdout}
old=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
threads=$(nproc)
tokens=${TOKENS:-6432}  # 4 tiles x 1608 rows
attn_steps=${ATTN_STEPS:-256 128}     # keys per step of the attention
gemm_blocks=${GEMM_BLOCKS:-256 128}   # tokens per block of the GEMM (the first: also at half the threads)
half=${HALF_THREADS-1}                 # empty: no runs at half the threads
build() {  # NAME DRIVER [NAME=VALUE...]: the tests' build of the driver (an old attention in place of ours for attn_old)
    local name=$1 driver=$2
    shift 2
    python3 - "$root" "$work/$name" "$driver" "$([ "$name" = attn_old ] && echo "$old")" "$@" <<'EOF'
import sys
from pathlib import Path
root, out, driver, old, *defines = sys.argv[1:]
sys.path.insert(0, f"{root}/tests")
from test_cpu_kernels import build_kernel_driver
build_kernel_driver(Path(out), driver, [], defines, {"attn_amx": Path(old).resolve()} if old else None)
EOF
}
{
    echo "== $(lscpu | grep -E '^Model name' | sed 's/  */ /g'); $threads threads; $(lscpu | grep -E '^Thread' | sed 's/  */ /g')"
    for keys in $attn_steps; do build "attn_$keys" attn_bf16 "MLLAMA_AMX_ATTN_STEP_KEYS=$keys" & done
    [ -n "$old" ] && build attn_old attn_bf16 &
    build attn_phases attn_bf16 MLLAMA_AMX_ATTN_PHASES &
    for kb in $gemm_blocks; do build "gemm_$kb" gemm_bf16 "MLLAMA_AMX_GEMM_BLOCK_TOKENS=$kb" & done
    build q4k qmm_q4k &
    build q6k qmm_q6k &
    cc -O2 -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16 -pthread "$root/bench/amx_peak.c" -o "$work/amx_peak" &
    wait
    echo "amx_peak $("$work/amx_peak")"
    for shape in "4096 14336" "14336 4096"; do  # the text layers' ffn_up/gate and ffn_down (Q4_K, repacked by ggml)
        for rows in 32 64 256; do  # prefill: AMX tiles against our VNNI kernel (up to 64 rows) and ggml's product
            # 6 copies of the weights (198 MB, past the L3): each run reads them from memory, and fills fewer
            tiles=$(QMM_COPIES=6 QMM_Q4K_TILES=1 "$work/q4k" $shape $rows "$threads" 5 | tail -1)
            echo "q4k K,M=$shape rows=$rows tiles: $tiles"
            [ "$rows" -gt 64 ] && continue  # the VNNI kernel's limit
            echo "q4k K,M=$shape rows=$rows vnni: $(QMM_COPIES=6 "$work/q4k" $shape $rows "$threads" 5 | tail -1)"
        done
    done
    for rows in 32 64 256; do  # the Q6_K ffn_down [14336 -> 4096] of Q4_K_M files: tiles against our Q6_K kernel
        tiles=$(QMM_COPIES=6 QMM_Q6K_TILES=1 "$work/q6k" 14336 4096 $rows "$threads" 5 | tail -1)
        echo "q6k K,M=14336 4096 rows=$rows tiles: $tiles"
        echo "q6k K,M=14336 4096 rows=$rows kernel: $(QMM_COPIES=6 "$work/q6k" 14336 4096 $rows "$threads" 5 | tail -1)"
    done
    for t in "$threads" ${half:+$((threads / 2))}; do
        for v in $attn_steps old phases; do
            [ -x "$work/attn_$v" ] && echo "attn_$v threads=$t $("$work/attn_$v" 80 16 "$tokens" "$t" 3)"
        done
    done
    runs=$(for kb in $gemm_blocks; do echo "$kb,$threads"; done; [ -n "$half" ] && echo "${gemm_blocks%% *},$((threads / 2))")
    for run in $runs; do
        set -- ${run/,/ }
        for shape in "1280 1280" "1280 5120" "5120 1280"; do
            echo "gemm_block=${1}tokens threads=$2 K,M=$shape $("$work/gemm_$1" $shape "$tokens" "$2" 3 | tr '\n' ' ')"
        done
    done
} 2>&1 | grep -v "^repack: " | tee "$out"  # ggml says so for each copy of the Q4_K weights
rm -rf "$work"
