#!/usr/bin/env bash
# The GPU checks in one run, for a machine lent for minutes (an H100/H200 with CUDA and PyTorch, no network):
# tests/test_gpu.py, the GPU benchmark (both engines on the GPU, bench/run.py --device CUDA0), and where the
# CPU has AMX tiles the AMX kernel tests and bench/gemm.py. Each step has a time limit and its log; the whole
# run reports what it measured even when a step fails.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Wheels in .whl/ (mllama, and what the machine lacks: cffi, gguf, llguidance, transformers, llama-models) and
# tarballs of installed packages (libggml-python built for CUDA, its symbolic links kept) are installed into
# /tmp/site first; without .whl/ the installed packages are used.
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
t0=$SECONDS
step() { echo "== $((SECONDS - t0)) s: $*"; }
left() { echo $(( ${BUDGET_S:-520} - (SECONDS - t0) )); }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
lscpu | grep -E "^Model name|^CPU\(s\)|^Thread|^L2|^L3"
grep -o -w -E "amx_bf16|amx_int8|amx_tile|avx512_bf16|avx512_fp16|avx512f" /proc/cpuinfo | sort | uniq -c

if [ -d .whl ]; then
    step install
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    for t in .whl/*.tar.xz; do tar -xJf "$t" -C /tmp/site || exit 1; done
    export PYTHONPATH=/tmp/site
fi
site=$(python3 -c "import site; print(site.getsitepackages()[0])")
libs=$(ls -d "$site"/nvidia/*/lib /usr/local/cuda/lib64 /usr/local/nvidia/lib64 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:-}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import mllama; print(mllama.devices()); print(mllama.system_info())" || exit 1

step "tests/test_gpu.py"
timeout 240 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 | tee "$out/test_gpu.log" | tail -15

step "bench/run.py --device CUDA0 --skip-full"
timeout $(( $(left) - 120 )) python3 bench/run.py --device CUDA0 --skip-full --out "$out/bench-gpu.json" \
    > "$out/bench-gpu.log" 2>&1
echo "rc=$?"; tail -30 "$out/bench-gpu.log"

if grep -q -w amx_bf16 /proc/cpuinfo && [ "$(left)" -gt 90 ]; then
    step "AMX kernel tests"
    MLLAMA_TEST_KERNELS=amx timeout $(( $(left) - 60 )) python3 -m pytest tests/test_amx_kernels.py \
        tests/test_cpu_kernels.py -q -p no:cacheprovider -rs -x 2>&1 | tee "$out/test_amx.log" | tail -8
    step "bench/gemm.py (AMX tiles against torch.matmul)"
    timeout $(( $(left) - 10 )) python3 bench/gemm.py --json "$out/gemm-cpu.json" 2>&1 | tail -6
fi

if [ "$(left)" -gt 100 ]; then
    step "full-size 11B Q4_K_M on CUDA0"
    python3 -m mllama.dev.synthetic_gguf /tmp/full.gguf --preset 11b --type q4_k_m > /dev/null 2>&1 &&
        timeout $(( $(left) - 5 )) python3 bench/workers.py mllama /tmp/full.gguf --image --decode 16 --device CUDA0 \
        > "$out/full-gpu.json" 2> "$out/full-gpu.err"
    echo "rc=$?"; tail -3 "$out/full-gpu.err"; python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print({k: r[k] for k in \
        ('load_s', 'vision_s', 'ttft_s', 'prefill_tok_s', 'decode_tok_s', 'decode_bytes_per_token')})" "$out/full-gpu.json"
fi
step done
