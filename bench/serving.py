"""Serving benchmark: aggregate decode tokens/s and per-stream inter-token latency (p50/p99) at 1, 2, 4
and 8 concurrent streams on the 11B-dims synthetic model (5 text layers, Q4_K_M; vision tower BF16),
time to first token of a new request while 4 others stream, and what a new request's image encode
does to the streams already running (they go on: the encode runs half a vision layer per step). Everything
in one process, one run, through the batch scheduler (Model.submit + run_step, the path `mllama serve`
drives). The stream counts run in --rounds rounds of
1, 2, 4, 8 streams, interleaved so that a shared machine's drift falls on all of them alike; each count
reports its median round (by aggregate tokens/s), and the ratios are between medians.

    python bench/serving.py [--quick] [--tokens 32] [--rounds 3] [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import configs, cpu_name  # noqa: E402

# An image of 1000 x 1000 pixels takes all 4 tiles (2 x 2 of 560) on Llama 3.2 Vision.


def prompt(model, i: int) -> list[int]:
    text = f"Request {i}: write a long and detailed story about a lighthouse keeper and the sea."
    return [model.hparams.bos_token_id] + model.tokenize(text)


def drive(model, requests) -> dict[int, list[float]]:
    """Steps until every request has ended; the time of each stream's token events."""
    times: dict[int, list[float]] = {id(r): [] for r in requests}
    while any(not s.done for r in requests for s in r.streams):
        model.run_step()
        now = time.perf_counter()
        for r in requests:
            events = r.streams[0].events
            while events:
                kind, _ = events.popleft()
                if kind == "token":
                    times[id(r)].append(now)
    return times


def streams(model, n: int, n_tokens: int) -> dict:
    requests = [model.submit(prompt(model, i), temperature=0.0, max_tokens=n_tokens) for i in range(n)]
    model.run_step()  # admission and prefill of every stream: not part of the decode figures
    t0 = time.perf_counter()
    times = drive(model, requests)
    wall = time.perf_counter() - t0
    gaps = np.concatenate([np.diff(t) for t in times.values() if len(t) > 1]) * 1e3
    tokens = sum(len(t) for t in times.values())
    return {"streams": n, "tokens": tokens, "aggregate_tok_s": tokens / wall,
            "per_stream_tok_s": tokens / wall / n, "itl_p50_ms": float(np.percentile(gaps, 50)),
            "itl_p99_ms": float(np.percentile(gaps, 99))}


def newcomer(model, n_tokens: int, image=None) -> dict:
    """4 streams decoding; a new request arrives (text, or with an image): its time to first token, the
    longest gap it causes in the running streams, and the tokens they get meanwhile (an image is encoded
    half a vision layer per step, between the streams' decode steps: scheduler.py)."""
    running = [model.submit(prompt(model, i), temperature=0.0, max_tokens=4 * n_tokens) for i in range(4)]
    for _ in range(4):
        model.run_step()
    before = time.perf_counter()
    images = [image] if image is not None else []
    toks = prompt(model, 99) if image is None else [model.hparams.bos_token_id, model.hparams.image_token_id] + \
        model.tokenize("Describe this image.")
    new = model.submit(toks, images, temperature=0.0, max_tokens=2)
    last = {id(r): before for r in running}
    longest, ttft, tokens = 0.0, None, 0
    while ttft is None:
        model.run_step()
        now = time.perf_counter()
        if any(k == "token" for k, _ in new.streams[0].events):
            ttft = now - before
        for r in running:
            if r.streams[0].events:
                longest = max(longest, now - last[id(r)])
                last[id(r)] = now
                tokens += sum(k == "token" for k, _ in r.streams[0].events)
                r.streams[0].events.clear()
    for r in running + [new]:
        model.scheduler.cancel(r)
    model.run_step()
    return {"ttft_s": ttft, "longest_stream_gap_s": longest, "stream_tokens_meanwhile": tokens,
            "streams_tok_s_meanwhile": tokens / ttft}


def two_turns(model, image) -> dict:
    """A stateless 2-turn chat (the second request carries the whole conversation, as OpenAI clients
    send it) with a 4-tile image: each turn's time to first token."""
    conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe this image."}]}]
    out = {}
    for turn in (1, 2):
        tokens, images = model.chat_prompt(conv)
        result = model.stream_text(tokens, images, temperature=0.0, max_tokens=8).finish()
        out[f"turn{turn}_ttft_s"], out[f"turn{turn}_prompt_tokens"] = result.timings.prompt_s, len(tokens)
        conv += [{"role": "assistant", "content": result.text}, {"role": "user", "content": "And the colours?"}]
    out["ratio"] = out["turn2_ttft_s"] / out["turn1_ttft_s"]
    return out


STREAM_COUNTS = (1, 2, 4, 8)


def median_round(runs: list[dict]) -> dict:
    """The run with the median aggregate tokens/s (the lower middle one for an even count), with every
    round's aggregate beside it."""
    ordered = sorted(runs, key=lambda r: r["aggregate_tok_s"])
    return {**ordered[(len(ordered) - 1) // 2], "aggregate_tok_s_rounds": [r["aggregate_tok_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small dimensions: a fast check of the script")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 1, 2, 4, 8 streams")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    parser.add_argument("--model", type=Path, help="a GGUF to use instead of writing the synthetic one")
    args = parser.parse_args()

    import mllama
    from mllama.dev.synthetic_gguf import write_synthetic_gguf
    from PIL import Image

    text, vision, _ = configs(args.quick)
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count()}, "tokens_per_stream": args.tokens,
              "rounds": max(1, args.rounds), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_synthetic_gguf(Path(tmp) / "q4_k_m.gguf", text, vision, type="q4_k_m",
                                                  vision_type="bf16")
        with mllama.Model(path, n_seq_max=8, n_ctx=512) as model:
            model.stream_text(prompt(model, 0), temperature=0.0, max_tokens=4).finish()  # warm-up
            rounds: dict[int, list[dict]] = {n: [] for n in STREAM_COUNTS}
            for _ in range(max(1, args.rounds)):
                for n in STREAM_COUNTS:
                    rounds[n].append(streams(model, n, args.tokens))
                    print(json.dumps(rounds[n][-1]), flush=True)
            result["runs"] = [median_round(rounds[n]) for n in STREAM_COUNTS]
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
            result["new_text_request"] = newcomer(model, args.tokens)
            result["new_image_request"] = newcomer(model, args.tokens, image)
            big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))
            result["two_turn_chat"] = two_turns(model, big)  # another image: the first turn encodes it
    one = result["runs"][0]["aggregate_tok_s"]
    for run in result["runs"]:
        run["vs_one_stream"] = run["aggregate_tok_s"] / one
        run["per_stream_vs_lone"] = run["per_stream_tok_s"] / one
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
