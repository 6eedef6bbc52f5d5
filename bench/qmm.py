"""The Q6_K kernel (`qmm`: csrc/kernels/x86/qmm_q6k.cpp on AVX-512 VNNI CPUs, qmm_q6k_avx2.cpp on AVX2 ones;
MLLAMA_AVX512=0 times the AVX2 form on an AVX-512 CPU) against ggml's mul_mat, side by side.

1. The two Q6_K products of the 11B model, [14336 -> 4096] (ffn_down) and [4096 -> 128256] (output),
   at 1, 2, 4 and 8 rows (ffn_down also at 16, 64 and 200: prefill, in passes of 8): tests/c/qmm_q6k.cpp
   times ggml's mul_mat and the kernel on the same random weights in one process (copies of the weights
   rotate so that each run reads them from memory); then the Q4_K kernel on ggml's repacked weights
   (tests/c/qmm_q4k.cpp: qmm_q4k_avx512.cpp on AVX-512 VNNI CPUs, where the AVX2 form qmm_q4k_avx2.cpp is timed
   too; also at 16, 64 and 200 rows, in passes of up to 64 / 8) on [14336 -> 4096] and [4096 -> 14336].
2. Whole decode steps of 1, 2, 4, 8 streams on the 11B-dims synthetic model (5 text layers, Q4_K_M:
   Q6_K output and some Q6_K ffn_down, Q4_K repacked), every kernel on vs every kernel but qmm, text only.

The machine may be shared: every figure is the median of --runs runs (each itself a median of reps).

    python bench/qmm.py [--model /tmp/b11.gguf] [--runs 3] [--json bench/results/qmm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {"ffn_down [14336 -> 4096]": (14336, 4096), "output [4096 -> 128256]": (4096, 128256)}
ROWS = (1, 2, 4, 8)
PREFILL_ROWS = (16, 64, 200)  # prefill: Q6_K in passes of 8 rows, Q4_K (AVX-512 form) in passes of up to 64
WITHOUT_QMM = "attn,gemm,gelu,xattn"  # every kernel of the text path but qmm (amx is vision only)
WITH_QMM = WITHOUT_QMM + ",qmm"  # what the default set ("1") runs for text


def timed(driver: Path, name: str, k: int, m: int, rows: int, runs: int, reps: int, env: dict | None = None) -> dict | None:
    """Medians over `runs` runs of a product driver (tests/c/qmm_*.cpp) timing ggml and the kernel; None
    where the driver skips (its kernel does not run here)."""
    fields = []
    for _ in range(runs):
        proc = subprocess.run([str(driver), str(k), str(m), str(rows), "2", str(reps)], capture_output=True, text=True,
                              check=True, env=env)
        if proc.stdout.startswith("skip"):
            return None
        fields.append(dict(item.split("=") for item in proc.stdout.splitlines()[-1].split()))
    ggml_ms = statistics.median(float(f["ggml_ms"]) for f in fields)
    qmm_ms = statistics.median(float(f["qmm_ms"]) for f in fields)
    gb = float(fields[0]["weight_bytes"]) / 1e9
    out = {"matrix": name, "rows": rows, "ggml_ms": round(ggml_ms, 2), "qmm_ms": round(qmm_ms, 2),
           "ggml_gbs": round(gb / ggml_ms * 1e3, 1), "qmm_gbs": round(gb / qmm_ms * 1e3, 1),
           "speedup": round(ggml_ms / qmm_ms, 2)}
    print(out, flush=True)
    return out


def products(driver: Path, runs: int) -> list[dict]:
    timings = [timed(driver, name, k, m, rows, runs, 15 if k * m < 1e8 else 7)
               for name, (k, m) in SHAPES.items() for rows in ROWS + (PREFILL_ROWS if m < 1e5 else ())]
    return [t for t in timings if t]


Q4K_SHAPES = {"ffn_down [14336 -> 4096]": (14336, 4096), "ffn_gate/up [4096 -> 14336]": (4096, 14336)}


def q4k_products(driver: Path, runs: int) -> list[dict]:
    """The Q4_K kernel's form for this CPU, and on an AVX-512 CPU its AVX2 form too (MLLAMA_AVX512=0), against
    ggml's mul_mat on ggml's repacked weights."""
    first = subprocess.run([str(driver), "256", "8", "1"], capture_output=True, text=True, check=True).stdout
    if first.startswith("skip"):
        return []
    forms = {"avx512": dict(os.environ), "avx2": {**os.environ, "MLLAMA_AVX512": "0"}}
    if first.startswith("form=avx2"):
        del forms["avx512"]
    rows_of = {"avx512": ROWS + PREFILL_ROWS, "avx2": ROWS + PREFILL_ROWS}
    return [{"form": form, **t} for form, env in forms.items() for name, (k, m) in Q4K_SHAPES.items()
            for rows in rows_of[form] if (t := timed(driver, name, k, m, rows, runs, 9, env))]


def decode_steps(model_path: Path, kernels: str, streams: int, n_steps: int) -> float:
    """Median ms of one decode step of `streams` rows (one token of each stream)."""
    import mllama
    from mllama.generation.engine import Part

    with mllama.Model(model_path, cpu_kernels=kernels, n_seq_max=max(ROWS), n_ctx=128) as m:
        engine = m.engine
        for s in range(streams):
            engine.evaluate([128000, 9906 + s, 1917, 11, 1268, 527], [], seq=s)
        times = []
        for step in range(n_steps):
            parts = [Part(s, [40 + step], len(engine.seqs[s].tokens), [], engine.rows_for(s, [40 + step]), [0])
                     for s in range(streams)]
            t0 = time.perf_counter()
            engine.decode(parts)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])  # the first steps page the weights in


def decoding(model_path: Path, runs: int, n_steps: int) -> list[dict]:
    out = []
    for streams in ROWS:
        off = statistics.median(decode_steps(model_path, WITHOUT_QMM, streams, n_steps) for _ in range(runs))
        on = statistics.median(decode_steps(model_path, WITH_QMM, streams, n_steps) for _ in range(runs))
        out.append({"streams": streams, "qmm_off_ms": round(off, 1), "qmm_on_ms": round(on, 1),
                    "speedup": round(off / on, 2)})
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/b11.gguf"),
                        help="the 11B-dims synthetic model (written there when missing)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="decode steps per run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    from test_cpu_kernels import build_kernel_driver
    from test_qmm_kernels import build_qmm_driver

    with tempfile.TemporaryDirectory() as tmp:
        result = {"products": products(build_qmm_driver(Path(tmp) / "qmm_q6k"), args.runs),
                  "q4k_products": q4k_products(build_kernel_driver(Path(tmp) / "qmm_q4k", "qmm_q4k",
                                                                    ["qmm_q4k_avx2", "qmm_q4k_avx512"]),
                                               args.runs)}
    if not args.skip_decode:
        if not args.model.exists():
            from mllama.dev.synthetic_gguf import write_synthetic_gguf
            from run import configs

            text, vision, _ = configs(False)
            write_synthetic_gguf(args.model, text, vision)
        result["decode"] = decoding(args.model, args.runs, args.steps)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
