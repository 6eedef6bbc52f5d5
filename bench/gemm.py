"""The vision tower's BF16 GEMMs, side by side in one process each: ggml's mul_mat, mllama's AVX-512
BF16 kernel and AMX tile kernel (where the CPU has them), mllama's AVX2 kernel (any x86 CPU with AVX2),
and torch.matmul in bf16 and fp32 (oneDNN: AMX tiles where the CPU has them; the faster of the two is
the machine's practical peak: on a CPU without AVX-512 BF16, fp32), on the shapes of the 11B vision
tower for one 4-tile image (tests/c/gemm_bf16.cpp and gemm_avx2.cpp time ours and ggml's; every
result is checked against ggml's within the summation-order bound first).

    python bench/gemm.py [--threads 2] [--reps 3] [--json bench/results/gemm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

N_TOKENS = 4 * 1608  # 4 tiles x 1601 positions padded to a multiple of 8 (the tower's rows)
SHAPES = {"q, k, v, o [1280 -> 1280]": (1280, 1280), "fc1 [1280 -> 5120]": (1280, 5120),
          "fc2 [5120 -> 1280]": (5120, 1280), "projector [7680 -> 4096]": (7680, 4096)}


def torch_ms(k: int, m: int, n: int, threads: int, reps: int, dtype: str = "bf16", device: str = "cpu") -> float:
    """torch.matmul's median time in ms for [n, k] x [k, m] on `device` (cpu, or cuda: cuBLAS)."""
    import torch

    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    x = torch.randn(n, k, device=device).to(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
    w = torch.randn(m, k, device=device).to(x.dtype)
    return median_ms(lambda: torch.matmul(x, w.t()), reps, sync)  # the warm-up: oneDNN or cuBLAS picks its kernel


def median_ms(call, reps: int, sync=lambda: None) -> float:
    """call()'s median time in ms over reps runs after one warm-up run (sync: waits for a device's queue)."""
    call()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=N_TOKENS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from mllama._native.cpu_features import cpu_report
    from test_cpu_kernels import build_kernel_driver

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        drivers = [build_kernel_driver(Path(tmp) / "gemm_bf16", "gemm_bf16", ["gemm_bf16", "gemm_amx", "gelu"]),
                   build_kernel_driver(Path(tmp) / "gemm_avx2", "gemm_avx2", ["gemm_avx2", "gelu"])]
        for name, (k, m) in SHAPES.items():
            env = {**os.environ, "MLLAMA_AMX_EMULATE": "0"}
            fields = {}
            for driver in drivers:
                proc = subprocess.run([str(driver), str(k), str(m), str(args.tokens), str(args.threads), str(args.reps)],
                                      capture_output=True, text=True, check=True, env=env)
                if not proc.stdout.startswith("skip"):
                    fields.update(item.split("=") for item in proc.stdout.split())
            gflop = 2 * k * m * args.tokens / 1e9
            torch_gflops = {dtype: round(gflop / torch_ms(k, m, args.tokens, args.threads, args.reps, dtype) * 1e3, 1)
                            for dtype in ("bf16", "fp32")}
            row = {"shape": name, "tokens": args.tokens,
                   "within_bound": {p: fields[p] for p in ("avx512", "tiles", "avx2", "gelu") if p in fields},
                   "torch_gflops": torch_gflops["bf16"], "torch_fp32_gflops": torch_gflops["fp32"]}
            peak = max(torch_gflops.values())
            for path in ("ggml", "avx512", "tiles", "avx2"):
                if f"{path}_gflops" not in fields or fields.get(path) == "none":  # not run here
                    continue
                row[f"{path}_gflops"] = round(float(fields[f"{path}_gflops"]), 1)
                row[f"{path}_vs_torch"] = round(row[f"{path}_gflops"] / peak, 2)
            rows.append(row)
            print(row, flush=True)
    result = {"machine": cpu_report(), "threads": args.threads, "gemms": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
