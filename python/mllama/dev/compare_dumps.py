"""Compare two folders of tensor dumps stage by stage and report the first node that diverges.

    python -m mllama.dev.compare_dumps OURS REFERENCE [--threshold 1e-4]

Each folder holds <name>.npy files (mllama writes them with dump_dir=..., or MLLAMA_DUMP_DIR; the
test-side PyTorch hook dumper writes the same names from transformers). Stages are taken in the
evaluation order of the first folder (its order.txt), else by name. Arrays are compared after
flattening when their element counts agree; where ours holds fewer rows of the same width (last dimension), with
the reference's leading rows (the projector's output covers an image's own tiles, which come first, while
transformers projects all of them). Any other difference is a shape difference.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class StageResult:
    name: str
    nmse: float | None  # None: shapes differ
    max_abs: float | None
    diverged: bool
    leading: bool = False  # ours held fewer values: compared with the reference's leading ones


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.sum((a64 - b64) ** 2) / max(float(np.sum(b64 ** 2)), 1e-30))


def stage_order(folder: Path) -> list[str]:
    order = folder / "order.txt"
    names = [n for n in order.read_text().split("\n") if n] if order.exists() else []
    seen = dict.fromkeys(names)
    for path in sorted(folder.glob("*.npy")):
        seen.setdefault(path.stem)
    return list(seen)


def compare(ours: Path, ref: Path, threshold: float = 1e-4) -> list[StageResult]:
    results = []
    for name in stage_order(ours):
        a_path, b_path = ours / f"{name}.npy", ref / f"{name}.npy"
        if not a_path.exists() or not b_path.exists():
            continue
        a, b = np.load(a_path), np.load(b_path)
        leading = a.size < b.size and a.ndim > 0 and b.ndim > 0 and a.shape[-1] == b.shape[-1]
        if a.size != b.size and not leading:
            results.append(StageResult(name, None, None, True))
            continue
        a, b = a.ravel(), b.ravel()[:a.size]
        err = nmse(a, b)
        results.append(StageResult(name, err, float(np.max(np.abs(a - b))), not err <= threshold, leading))
    return results


def first_divergence(results: list[StageResult]) -> StageResult | None:
    return next((r for r in results if r.diverged), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mllama.dev.compare_dumps", description=__doc__.split("\n\n")[0])
    parser.add_argument("ours", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--threshold", type=float, default=1e-4, help="NMSE above which a stage diverges")
    args = parser.parse_args(argv)
    results = compare(args.ours, args.reference, args.threshold)
    if not results:
        print("no common stages")
        return 2
    width = max(len(r.name) for r in results)
    for r in results:
        detail = "shape differs" if r.nmse is None else f"nmse {r.nmse:.3e}  max|d| {r.max_abs:.3e}"
        detail += "  (the reference's leading values)" if r.leading else ""
        print(f"{r.name:<{width}}  {detail}{'  <-- diverges' if r.diverged else ''}")
    first = first_divergence(results)
    print(f"first divergence: {first.name}" if first else f"all {len(results)} stages within {args.threshold:g}")
    return 1 if first else 0


if __name__ == "__main__":
    sys.exit(main())
