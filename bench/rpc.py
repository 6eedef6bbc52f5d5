"""Loopback RPC benchmark: decode and prefill speed of the same model with every text layer local, on one
`mllama rpc-server` worker, and split over two workers (1:1), measured side by side in one run, with
the bytes each token moves between stages. The vision tower stays local in every case (text-only
prompts: the figures are the decoder's).

    python bench/rpc.py --model FILE.gguf [--prompt 64] [--decode 32] [--out bench/results/rpc.json]

Needs a ggml built with -DGGML_RPC=ON. On one machine the workers share its cores and memory bandwidth
with the client; since the stages run one after another (a pipeline of one token), only one of them
computes at a time, so the difference to the local run is the RPC overhead: serialization, loopback
transfers and the per-split synchronization.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import cpu_name  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mllama", "rpc-server", "--port", str(port),
                             "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("rpc-server did not start")


def loopback_bytes() -> int | None:
    """Bytes received on the loopback interface so far (Linux: /proc/net/dev); None elsewhere."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[0])
    except OSError:
        pass
    return None


def measure(path: str, n_prompt: int, n_decode: int, **placement) -> dict:
    import mllama

    t0 = time.perf_counter()
    with mllama.Model(path, n_ctx=n_prompt + n_decode + 8, **placement) as model:
        load_s = time.perf_counter() - t0
        text = "Write a long and detailed story about a lighthouse keeper and the sea. " * 8
        tokens = ([model.hparams.bos_token_id] + model.tokenize(text))[:n_prompt]
        engine = model.engine
        engine.evaluate(tokens[8:0:-1], [])  # warm-up (first-use paging, graph allocation); shares no prefix
        t0 = time.perf_counter()
        logits = engine.evaluate(tokens, [])
        prefill_s = time.perf_counter() - t0
        token = int(logits.argmax())
        lo0, t0 = loopback_bytes(), time.perf_counter()
        for _ in range(n_decode):
            token = int(engine.step(token, 0).argmax())
        decode_s, lo1 = time.perf_counter() - t0, loopback_bytes()
        runs = [(p.first_layer, p.n_layers, p.endpoint or p.device) for p in model.placement if p.component == "text"]
        hp = model.hparams
    return {"placement": runs, "load_s": round(load_s, 2), "prefill_tok_s": round(len(tokens) / prefill_s, 2),
            "decode_tok_s": round(n_decode / decode_s, 2), "decode_ms_per_token": round(1e3 * decode_s / n_decode, 2),
            "n_embd": hp.n_embd, "n_vocab": hp.n_vocab,
            "loopback_bytes_per_token": None if lo0 is None else round((lo1 - lo0) / n_decode)}


def hop_bytes(entry: dict, remote_output: bool) -> dict:
    """Bytes per decoded token crossing the network: the F32 hidden state at each change of device,
    and the logits row when the output layer is remote."""
    devices = [d for _, _, d in entry["placement"]]
    hops = sum(1 for a, b in zip(devices, devices[1:]) if a != b) + (devices[0] != "CPU")
    return {"hops_per_token": hops, "hidden_bytes_per_hop": 4 * entry["n_embd"],
            "logits_bytes_per_token": 4 * entry["n_vocab"] if remote_output else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="worker threads (default: the physical cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    workers = [start_worker(args.threads) for _ in range(2)]
    endpoints = [e for _, e in workers]
    try:
        cases = {
            "local": measure(args.model, args.prompt, args.decode, device="cpu"),
            "one_worker": measure(args.model, args.prompt, args.decode, device="cpu", rpc=endpoints[:1]),
            "two_workers": measure(args.model, args.prompt, args.decode, device="cpu", rpc=endpoints,
                                   tensor_split=[1, 1]),
        }
    finally:
        for proc, _ in workers:
            proc.kill()
    for name in ("one_worker", "two_workers"):
        cases[name].update(hop_bytes(cases[name], remote_output=True))
        cases[name]["decode_vs_local"] = round(cases[name]["decode_tok_s"] / cases["local"]["decode_tok_s"], 3)
        cases[name]["prefill_vs_local"] = round(cases[name]["prefill_tok_s"] / cases["local"]["prefill_tok_s"], 3)
        extra_ms = cases[name]["decode_ms_per_token"] - cases["local"]["decode_ms_per_token"]
        cases[name]["rpc_overhead_ms_per_token"] = round(extra_ms, 2)
    result = {"machine": cpu_name(), "model": args.model, "prompt": args.prompt, "decode": args.decode, **cases}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
