"""The vision tower's attention for one 4-tile image, side by side in one run: mllama's kernels (AMX tiles,
AVX-512 BF16, AVX2, where the CPU has them; tests/c/attn_bf16.cpp with the image's own padding mask, the packing
of K and V included) and torch's scaled_dot_product_attention in bf16 (oneDNN's flash attention, AMX tiles where
the CPU has them: what transformers' tower calls), with that mask and without one, on the same shape: 16 heads of
80 channels, 4 x 1608 tokens; and torch's in fp32 with the mask, the reference where bf16 has no fast path (CPUs
without AVX-512 BF16: there torch's bf16 falls back to slow code, and transformers runs in fp32, as `bench/run.py
--transformers fp32`). Ratios are to the faster of torch's two masked times. GFLOPS count the two products
(4 D N^2 H). The kernels' accuracy is tests/test_cpu_kernels.py's and tests/test_amx_kernels.py's; this only times.

    python bench/attention.py [--threads N] [--reps 3] [--json bench/results/attention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from gemm import median_ms  # noqa: E402  (bench/gemm.py: the same timing of torch's side)

HEAD_DIM, HEADS, TILE_ROWS, TILES, PADDING_ROWS = 80, 16, 1608, 4, 7  # the 11B tower; its mask: attn_bf16.cpp's


def torch_ms(threads: int, reps: int, masked: bool, dtype: str = "bf16") -> float:
    """torch's SDPA median time in ms on the tower's shape in `dtype` (bf16, fp32); masked: padding x padding
    pairs -inf."""
    import torch

    torch.set_num_threads(threads)
    n = TILES * TILE_ROWS
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM).to(torch_dtype) for _ in range(3))
    mask = None
    if masked:
        padding = (torch.arange(n) % TILE_ROWS) >= TILE_ROWS - PADDING_ROWS
        mask = torch.zeros(n, n, dtype=torch_dtype)
        mask[padding[:, None] & padding[None, :]] = float("-inf")
        mask = mask[None, None]
    return median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from mllama._native.cpu_features import cpu_report
    from test_cpu_kernels import build_kernel_driver

    n = TILES * TILE_ROWS
    gflop = 4 * HEAD_DIM * n * n * HEADS / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        driver = build_kernel_driver(Path(tmp) / "attn_bf16", "attn_bf16", [])
        env = {**os.environ, "MLLAMA_AMX_EMULATE": "0", "ATTN_MASK": "tower"}
        proc = subprocess.run([str(driver), str(HEAD_DIM), str(HEADS), str(n), str(args.threads), str(args.reps)],
                              capture_output=True, text=True, check=True, env=env)
    if proc.stdout.startswith("skip"):  # no AVX2: none of our x86 attention kernels runs here
        sys.exit(proc.stdout.strip())
    fields = dict(item.split("=") for item in proc.stdout.split())
    ms = {path: float(fields[f"{path}_ms"]) for path in ("tiles", "avx512", "avx2") if fields[f"{path}_ms"] != "none"}
    ms["torch_masked"] = torch_ms(args.threads, args.reps, masked=True)
    ms["torch_unmasked"] = torch_ms(args.threads, args.reps, masked=False)
    ms["torch_fp32_masked"] = torch_ms(args.threads, args.reps, masked=True, dtype="fp32")
    reference = min(ms["torch_masked"], ms["torch_fp32_masked"])
    rows = {name: {"ms": round(t, 1), "gflops": round(gflop / t * 1e3, 1),
                   "time_vs_torch_masked": round(t / reference, 3)} for name, t in ms.items()}
    for name, row in rows.items():
        print(f"{name:17s} {row['ms']:9.1f} ms {row['gflops']:8.1f} GFLOPS  {row['time_vs_torch_masked']:.3f}x "
              "torch's faster masked time", flush=True)
    result = {"machine": cpu_report(), "threads": args.threads, "shape": {"head_dim": HEAD_DIM, "heads": HEADS,
              "tokens": n, "padding_rows_per_tile": PADDING_ROWS}, "attention": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
