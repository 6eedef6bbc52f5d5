"""Decode and prefill at long contexts: the self-attention over F16 caches by our attention kernel (every CPU kernel,
the default) against ggml's flash attention (every kernel but xattn), one process, the two contexts taking turns,
on the 11B-dims synthetic model (5 text layers, Q4_K_M; bench/serving.py's --model file, written when missing).
Per context length: the prompt's prefill time and the median decode time per token over --rounds rounds of
--steps steps. Text only: the one cross-attention layer is skipped, so only the self-attention differs.

    python bench/long_context.py [--model /tmp/b11.gguf] [--lengths 512 2048 4096] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mllama  # noqa: E402

KERNELS = {"ours": "1", "ggml_attention": "attn,gemm,gelu,qmm,amx,fuse"}  # every CPU kernel; all but xattn


def model_file(path: Path) -> Path:
    """The 11B-dims synthetic model at `path` (written there when missing, as bench/serving.py writes it)."""
    if not path.exists():
        from mllama.dev.synthetic_gguf import write_synthetic_gguf
        from run import configs

        text, vision, _ = configs(False)
        write_synthetic_gguf(path, text, vision, type="q4_k_m", vision_type="bf16")
    return path


def measure(path: Path, length: int, steps: int, rounds: int) -> dict:
    rng = np.random.default_rng(length)
    models, out = {}, {"context_tokens": length}
    for name, kernels in KERNELS.items():
        m = mllama.Model(path, n_ctx=length + steps * rounds + 1, cpu_kernels=kernels)
        tokens = [m.hparams.bos_token_id] + rng.integers(1000, 100000, length - 1).tolist()
        t0 = time.perf_counter()
        logits = m.engine.evaluate(tokens, [])
        out[f"{name}_prefill_s"] = round(time.perf_counter() - t0, 2)
        out[f"{name}_self_attention"] = m.op_paths()["self-attention"]
        models[name] = [m, int(np.argmax(logits)), []]
    for _ in range(rounds):  # the contexts take turns: the machine's drift falls on both
        for name, entry in models.items():
            m, token, times = entry
            t0 = time.perf_counter()
            for _ in range(steps):
                token = int(np.argmax(m.engine.step(token, 0)))
            times.append((time.perf_counter() - t0) / steps * 1e3)
            entry[1] = token
    for name, (m, _, times) in models.items():
        out[f"{name}_decode_ms"] = round(statistics.median(times), 2)
        out[f"{name}_decode_rounds_ms"] = [round(t, 2) for t in times]
        m.close()
    out["decode_speedup"] = round(out["ggml_attention_decode_ms"] / out["ours_decode_ms"], 2)
    out["prefill_speedup"] = round(out["ggml_attention_prefill_s"] / out["ours_prefill_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/b11.gguf"), help="written there when missing")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    path = model_file(args.model)
    results = []
    for length in args.lengths:
        results.append(measure(path, length, args.steps, args.rounds))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(path), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
