"""The vision tower's BF16 GEMMs, side by side in one process each: ggml's mul_mat, mllama's AVX-512
BF16 kernel, mllama's AMX tile kernel (where the CPU has AMX) and torch.matmul in bf16 (oneDNN: AMX
tiles where the CPU has them; the machine's practical peak), on the shapes of the 11B vision tower
for one 4-tile image (tests/c/gemm_bf16.cpp times ours and ggml's; every result is checked against
ggml's within the summation-order bound first).

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


def torch_ms(k: int, m: int, n: int, threads: int, reps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(n, k).to(torch.bfloat16)
    w = torch.randn(m, k).to(torch.bfloat16)
    torch.matmul(x, w.t())  # warm-up (oneDNN picks its kernel)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(x, w.t())
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
        driver = build_kernel_driver(Path(tmp) / "gemm_bf16", "gemm_bf16", ["gemm_bf16", "gemm_amx", "gelu"])
        for name, (k, m) in SHAPES.items():
            env = {**os.environ, "MLLAMA_AMX_EMULATE": "0"}
            proc = subprocess.run([str(driver), str(k), str(m), str(args.tokens), str(args.threads), str(args.reps)],
                                  capture_output=True, text=True, check=True, env=env)
            fields = dict(item.split("=") for item in proc.stdout.split())
            gflop = 2 * k * m * args.tokens / 1e9
            ref_ms = torch_ms(k, m, args.tokens, args.threads, args.reps)
            row = {"shape": name, "tokens": args.tokens, "within_bound": {"avx512": fields["avx512"], "tiles": fields["tiles"]},
                   "torch_gflops": round(gflop / ref_ms * 1e3, 1)}
            for path in ("ggml", "avx512", "tiles"):
                if path == "tiles" and fields["tiles"] == "none":
                    continue
                row[f"{path}_gflops"] = round(float(fields[f"{path}_gflops"]), 1)
                row[f"{path}_vs_torch"] = round(row[f"{path}_gflops"] / row["torch_gflops"], 2)
            rows.append(row)
            print(row, flush=True)
    result = {"machine": cpu_report(), "threads": args.threads, "gemms": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
