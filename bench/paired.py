"""Both engines' image encode and prefill taking turns in one run: the ratio that holds on a machine whose speed
drifts while it is measured.

    python bench/paired.py                       # ~12 minutes on 2 cores; writes bench/results/paired.json
    python bench/paired.py --rounds 6 --out F    # more rounds
    python bench/paired.py --quick --out /tmp/p.json   # small dimensions: the pipeline in a minute

bench/run.py runs each engine in its own process, one after the other, minutes apart. On a shared virtual machine
whose speed swings from one minute to the next (the 2-core AMX Xeon of bench/README.md: mllama's image took 30.2 s
in one bench/run.py and 43.8 s in the next, transformers' 58.2 s and 38.3 s, so the ratio went from 0.52x to 1.15x)
that ratio says more about the machine than about the engines. Here both models stay loaded in two processes
(`bench/workers.py ENGINE MODEL --serve`: mllama's 11B-dims Q4_K_M with BF16 vision, transformers bf16 built from
the same config, as bench/run.py; both on the CPU), and each round times one image encode of each engine, then
--prefills 64-token prefills of each (their median: a prefill takes under a second, and one alone swung by 1.5x from
round to round), in alternating order (mllama first in even rounds, transformers first in odd ones; the prefills
taking turns within a round too), so that both sample the same minutes. A first round (each engine's first image
and prefill: packing weights, allocating buffers, building primitives) is kept apart; each timed round's ratios
(mllama / transformers: time for the image, speed for the prefill) and their medians go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Server:
    """One engine's warm process (bench/workers.py --serve): a request line in, one JSON line out."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, str(HERE / "workers.py"), *args, "--serve"]
        print("  $", " ".join(cmd[1:]), flush=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.proc.args[2]} ended ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def write_models(work: Path, quick: bool) -> tuple[Path, Path]:
    """bench/run.py's models: 11B dims, 5 text layers (Q4_K_M) + the full vision tower (BF16); --quick: small."""
    from mllama.dev.synthetic_gguf import write_synthetic_gguf
    from run import configs
    from workers import IMAGE_TOKEN

    text, vision, _ = configs(quick)
    gguf, config = work / "q4_k_m.gguf", work / "config.json"
    write_synthetic_gguf(gguf, text, vision, type="q4_k_m", vision_type="bf16")
    config.write_text(json.dumps({"text_config": text, "vision_config": vision, "image_token_index": IMAGE_TOKEN}))
    return gguf, config


def rounds(servers: dict[str, Server], n_rounds: int, n_prefills: int) -> list[dict]:
    out = []
    for r in range(n_rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        entry = {"order": order}
        for name in order:
            entry[f"{name}_vision_s"] = servers[name].ask("image")["vision_s"]
        prefills = {name: [] for name in order}
        for i in range(n_prefills):  # taking turns within the round too (ABBA...): the median of each engine's
            for name in order if i % 2 == 0 else reversed(order):
                prefills[name].append(servers[name].ask("prefill")["prefill_tok_s"])
        for name in order:
            entry[f"{name}_prefill_runs_tok_s"] = prefills[name]
            entry[f"{name}_prefill_tok_s"] = statistics.median(prefills[name])
        entry["vision_ratio"] = entry["mllama_vision_s"] / entry["transformers_vision_s"]
        entry["prefill_ratio"] = entry["mllama_prefill_tok_s"] / entry["transformers_prefill_tok_s"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prefills", type=int, default=3, help="prefills of each engine per round (their median)")
    parser.add_argument("--quick", action="store_true", help="small dimensions: a check of the pipeline")
    parser.add_argument("--work", type=Path, default=None, help="folder for the GGUF file (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "paired.json")
    args = parser.parse_args()

    import mllama
    from mllama._native.cpu_features import cpu_report
    from run import cpu_name

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        gguf, config = write_models(Path(tmp), args.quick)
        servers = {"mllama": Server("mllama", str(gguf)), "transformers": Server("transformers", str(config))}
        try:  # a first round untimed in the ratios: packing weights, allocating buffers, building primitives
            first = rounds(servers, 1, args.prefills)[0]
            runs = rounds(servers, args.rounds, args.prefills)
        finally:
            for server in servers.values():
                server.close()
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "ggml": mllama.system_info(), **cpu_report()},
              "threads": {name: server.info["threads"] for name, server in servers.items()},
              "first_round": first, "rounds": runs,
              "median_vision_ratio": statistics.median(r["vision_ratio"] for r in runs),
              "median_prefill_ratio": statistics.median(r["prefill_ratio"] for r in runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_vision_ratio", "median_prefill_ratio")}))


if __name__ == "__main__":
    main()
