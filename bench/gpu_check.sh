#!/usr/bin/env bash
# The GPU checks in one run, for a machine lent for minutes (an H100/H200 with CUDA and PyTorch, no network):
# tests/test_gpu.py, the GPU benchmark (both engines on the GPU: bench/run.py --device CUDA0, then the full-size
# 11B Q4_K_M), and where the host CPU has AMX tiles: the AMX kernel tests, bench/gemm.py and both engines on the
# CPU. Each step has a time limit (BUDGET_S in all, default 580 s) and the run reports what it measured even
# when a step fails. About 10 minutes on an H200 with a 16-core Xeon host: an estimate from the steps' times
# in the two calls of 2026-12-04 (7 and 5 minutes), which ran them in another order.
#
#   bash bench/gpu_wheels.sh                  # here, once: .whl/ (mllama, ggml built for CUDA, what the machine lacks)
#   bash bench/gpu_check.sh [OUT_DIR]         # there, with .whl/ carried; writes at most 7 files (+ the caller's log)
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
    for t in .whl/*.tar.xz; do [ -e "$t" ] && { tar -xJf "$t" -C /tmp/site || exit 1; }; done
    export PYTHONPATH=/tmp/site
fi
site=$(python3 -c "import site; print(site.getsitepackages()[0])")
libs=$(ls -d "$site"/nvidia/*/lib /usr/local/cuda/lib64 /usr/local/nvidia/lib64 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:-}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import mllama; print(mllama.devices()); print(mllama.system_info())" || exit 1

step "tests/test_gpu.py"
timeout 150 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 | tail -40

step "bench/run.py --device CUDA0 --skip-full"
timeout 240 python3 bench/run.py --device CUDA0 --skip-full --out "$out/bench-gpu.json" > "$out/bench-gpu.log" 2>&1
echo "rc=$?"; tail -12 "$out/bench-gpu.log"; rm -f "$out/bench-gpu.log"

summary() {  # FILE: the figures of one bench/workers.py result
    python3 -c "import json, sys; r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print({k: r.get(k) \
        for k in ('load_s', 'vision_s', 'ttft_s', 'prefill_tok_s', 'decode_tok_s', 'decode_bytes_per_token')})" "$1"
}

if [ "$(left)" -gt 100 ]; then
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

if grep -q -w amx_bf16 /proc/cpuinfo && [ "$(left)" -gt 240 ]; then
    step "AMX kernel tests"
    MLLAMA_TEST_KERNELS=amx timeout 170 python3 -m pytest tests/test_amx_kernels.py tests/test_cpu_kernels.py -q \
        -p no:cacheprovider -rs 2>&1 | tee "$out/test_amx.log" | grep -E "passed|failed|FAILED|^E " | head -20
fi
if grep -q -w amx_bf16 /proc/cpuinfo && [ "$(left)" -gt 120 ]; then
    step "both engines on the CPU (11B dims, 5 text layers, Q4_K_M; ggml's CPU side is the CUDA build's generic one)"
    python3 -c "import json, sys; sys.path.insert(0, 'bench'); from pathlib import Path; from run import configs
from mllama.dev.synthetic_gguf import write_synthetic_gguf
text, vision, _ = configs(False)
write_synthetic_gguf(Path('/tmp/b11.gguf'), text, vision, type='q4_k_m', vision_type='bf16')
Path('/tmp/cfg.json').write_text(json.dumps({'text_config': text, 'vision_config': vision, 'image_token_index': 128256}))"
    timeout 100 python3 bench/workers.py mllama /tmp/b11.gguf --image --device cpu > "$out/cpu-mllama.json" &&
        summary "$out/cpu-mllama.json"
    timeout $(( $(left) - 5 )) python3 bench/workers.py transformers /tmp/cfg.json --dtype bf16 --device cpu \
        > "$out/cpu-hf.json" && summary "$out/cpu-hf.json"
fi
if grep -q -w amx_bf16 /proc/cpuinfo && [ "$(left)" -gt 60 ]; then
    step "bench/gemm.py (AMX tiles against torch.matmul)"
    timeout $(( $(left) - 5 )) python3 bench/gemm.py --json "$out/gemm-cpu.json" 2>&1 | tail -4
fi
step done
