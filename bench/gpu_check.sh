#!/usr/bin/env bash
# The GPU machine's checks in one run, for a machine lent for minutes (an H100/H200 with CUDA and PyTorch, no
# network). Where the host CPU has AMX tiles (the only AMX machine this project sees), those first: the AMX
# kernels' tuning sweep (bench/amx_sweep.sh), their tests on hardware tiles, both engines on the CPU (with ggml's
# CPU backend built for that CPU where .whl/ holds libggml-cpu-native.tar.xz) and a profiled image; then
# tests/test_gpu.py, the full-size 11B Q4_K_M on the GPU with a profiled decode, the GPU benchmark (both engines
# on the GPU: bench/run.py --device CUDA0) and bench/gemm.py. Each step has a time limit
# (BUDGET_S in all, default 580 s) and the run reports what it measured even when a step fails. STEPS names the
# steps to run (default all): sweep amx_tests cpu_profile cpu_bench gpu_tests gpu_full gpu_bench gemm.
#
#   bash bench/gpu_wheels.sh                  # here, once: .whl/ (mllama, ggml for CUDA and for the host's CPU, ...)
#   bash bench/gpu_check.sh [OUT_DIR]         # there, with .whl/ carried; writes at most 7 files (+ the caller's log)
#
# Every file it writes in OUT_DIR: sweep.txt, cpu-mllama.json, cpu-hf.json, prof-cpu.tsv, full-gpu.json,
# prof-gpu.tsv, bench-gpu.json or gemm-cpu.json (the GPU benchmark's, or where it did not run, the CPU GEMMs').
#
# With .whl/, its wheels and tarballs are installed into /tmp/site first; without it, the installed packages run.
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
t0=$SECONDS
step() { echo "== $((SECONDS - t0)) s: $*"; }
left() { echo $(( ${BUDGET_S:-580} - (SECONDS - t0) )); }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
lscpu | grep -E "^Model name|^CPU\(s\)|^Thread|^L2|^L3"
grep -o -w -E "amx_bf16|amx_int8|amx_tile|avx512_bf16|avx512_fp16|avx512f" /proc/cpuinfo | sort | uniq -c

if [ -d .whl ]; then
    step install
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    tar -xJf .whl/libggml-cuda.tar.xz -C /tmp/site || exit 1
    export PYTHONPATH=/tmp/site
    if [ -e .whl/libggml-cpu-native.tar.xz ]; then  # mllama again, beside ggml's CPU backend built for this CPU
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_cpu .whl/mllama-*.whl &&
            tar -xJf .whl/libggml-cpu-native.tar.xz -C /tmp/site_cpu && cpu_site=/tmp/site_cpu:/tmp/site
    fi
fi
site=$(python3 -c "import site; print(site.getsitepackages()[0])")
libs=$(ls -d "$site"/nvidia/*/lib /usr/local/cuda/lib64 /usr/local/nvidia/lib64 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:-}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import mllama; print(mllama.devices()); print(mllama.system_info())" || exit 1

amx=$(grep -q -w amx_bf16 /proc/cpuinfo && echo 1)
steps=" ${STEPS:-sweep amx_tests cpu_profile cpu_bench gpu_tests gpu_full gpu_bench gemm} "
want() { [[ "$steps" == *" $1 "* ]]; }
cpu_run() { PYTHONPATH=${cpu_site:-${PYTHONPATH:-}} "$@"; }  # the CPU steps: with the native CPU build where it came

summary() {  # FILE: the figures of one bench/workers.py result
    python3 -c "import json, sys; r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print({k: r.get(k) \
        for k in ('load_s', 'vision_s', 'ttft_s', 'prefill_tok_s', 'decode_tok_s', 'decode_bytes_per_token')})" "$1"
}

if [ -n "$amx" ] && want sweep; then
    step "AMX tuning sweep (bench/amx_sweep.sh)"
    cpu_run timeout 240 bash bench/amx_sweep.sh "$out/sweep.txt" ${OLD_ATTN:-} > /dev/null 2>&1; cat "$out/sweep.txt"
fi
if [ -n "$amx" ] && want amx_tests; then
    step "AMX kernel tests on the hardware tiles, then every model on the tile path (SIGINT at the limit: a summary)"
    cpu_run timeout -s INT 120 python3 -m pytest tests/test_amx_kernels.py -k hardware -q -p no:cacheprovider 2>&1 | tail -3
    MLLAMA_TEST_KERNELS=amx cpu_run timeout -s INT 120 python3 -m pytest tests/test_cpu_kernels.py -q -p no:cacheprovider \
        2>&1 | tail -6
fi
if [ -n "$amx" ] && { want cpu_profile || want cpu_bench; } && [ "$(left)" -gt 100 ]; then
    cpu_run python3 -c "import mllama; print(mllama.system_info())"
    python3 -c "import json, sys; sys.path.insert(0, 'bench'); from pathlib import Path; from run import configs
from mllama.dev.synthetic_gguf import write_synthetic_gguf
text, vision, _ = configs(False)
write_synthetic_gguf(Path('/tmp/b11.gguf'), text, vision, type='q4_k_m', vision_type='bf16')
Path('/tmp/cfg.json').write_text(json.dumps({'text_config': text, 'vision_config': vision, 'image_token_index': 128256}))"
fi
profile_image() {  # FILE: one image encoded with MLLAMA_PROFILE on the CPU
    cpu_run timeout 60 ${PROFILE_RUN:-} python3 -X faulthandler -c "import sys, mllama; sys.path.insert(0, 'bench')
from workers import bench_image
from mllama.generation.engine import PreparedImage
with mllama.Model('/tmp/b11.gguf', device='cpu', n_ctx=256, n_image_slots=1, profile=sys.argv[1]) as m:
    pre = mllama.preprocess(bench_image(), m)
    m.engine.encode(0, PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, 'b'))" "$1"
}
if [ -n "$amx" ] && want cpu_profile && [ "$(left)" -gt 60 ]; then
    step "one image profiled on the CPU (MLLAMA_PROFILE)"
    profile_image "$out/prof-cpu.tsv"
    rc=$?
    if [ "$rc" = 132 ] && [ -n "${cpu_site:-}" ]; then  # SIGILL from the native build (its AMX layout: repack.h)
        dmesg 2>/dev/null | grep -i -E "trap|invalid opcode" | tail -3
        grep -m1 "^flags" /proc/cpuinfo
        if command -v gdb > /dev/null; then  # the instruction and where
            printf 'run\nbt 12\nx/2i $pc\n' > /tmp/gdb-sigill
            PROFILE_RUN="gdb -q -batch -x /tmp/gdb-sigill --args" profile_image /tmp/prof-sigill.tsv 2>&1 |
                grep -v -E "^\[|^warning" | tail -25
        fi
        echo "the native CPU build failed (SIGILL): the CUDA build's CPU backend from here on"
        cpu_site=""
        profile_image "$out/prof-cpu.tsv"
        rc=$?
    fi
    [ "$rc" = 0 ] && head -16 "$out/prof-cpu.tsv"
fi
if [ -n "$amx" ] && want cpu_bench && [ "$(left)" -gt 160 ]; then
    step "both engines on the CPU (11B dims, 5 text layers, Q4_K_M)"
    cpu_run timeout 100 python3 bench/workers.py mllama /tmp/b11.gguf --image --device cpu > "$out/cpu-mllama.json" &&
        summary "$out/cpu-mllama.json"
    timeout $(( $(left) - 5 )) python3 bench/workers.py transformers /tmp/cfg.json --dtype bf16 --device cpu \
        > "$out/cpu-hf.json" && summary "$out/cpu-hf.json"
fi
rm -f /tmp/b11.gguf

if want gpu_tests; then
    step "tests/test_gpu.py"
    timeout 150 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 | tail -40
fi

if want gpu_bench && [ "$(left)" -gt 300 ]; then
    step "bench/run.py --device CUDA0 --skip-full"
    timeout 240 python3 bench/run.py --device CUDA0 --skip-full --out "$out/bench-gpu.json" > "$out/bench-gpu.log" 2>&1
    echo "rc=$?"; tail -12 "$out/bench-gpu.log"; rm -f "$out/bench-gpu.log"
fi

if want gpu_full && [ "$(left)" -gt 100 ]; then
    step "full-size 11B Q4_K_M on CUDA0"
    python3 -m mllama.dev.synthetic_gguf /tmp/full.gguf --preset 11b --type q4_k_m > /dev/null &&
        timeout $(( $(left) - 5 )) python3 bench/workers.py mllama /tmp/full.gguf --image --decode 16 --device CUDA0 \
        > "$out/full-gpu.json"
    echo "rc=$?"; summary "$out/full-gpu.json"
    step "its decode profiled (MLLAMA_PROFILE: a sync per node, so the shares matter, not the total)"
    timeout 60 python3 -c "import sys, numpy as np, mllama; sys.path.insert(0, 'bench'); from workers import bench_image
from mllama.generation.engine import PreparedImage
with mllama.Model('/tmp/full.gguf', device='CUDA0', n_ctx=256, n_image_slots=1, profile=sys.argv[1]) as m:
    pre = mllama.preprocess(bench_image(), m); img = PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, 'b')
    m.engine.encode(0, img); tok = int(np.argmax(m.engine.evaluate([128000, 128256, 1000, 2000], [img])))
    for _ in range(16): tok = int(np.argmax(m.engine.step(tok, 1)))" "$out/prof-gpu.tsv" && head -12 "$out/prof-gpu.tsv"
    rm -f /tmp/full.gguf
fi

if [ -n "$amx" ] && want gemm && [ ! -e "$out/bench-gpu.json" ] && [ "$(left)" -gt 60 ]; then
    step "bench/gemm.py (AMX tiles against torch.matmul)"
    cpu_run timeout $(( $(left) - 5 )) python3 bench/gemm.py --json "$out/gemm-cpu.json" 2>&1 | tail -4
fi
step done
