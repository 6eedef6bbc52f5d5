"""What constrained decoding costs per token: llguidance's mask at the full 128,257-token vocabulary
against the decode time of a token on the 11B-dims synthetic model, written to JSON.

    python bench/grammar.py            # ~4 minutes on 2 cores; writes bench/results/grammar.json
    python bench/grammar.py --quick    # small text dims (the mask figures are the same: same vocabulary)

Model: bench/run.py's text model at 11B dimensions with 5 layers, Q4_K_M, with a small vision tower
(no image is used: decode without one is a little faster, so the overhead fraction is, if anything,
overstated). Figures:
- the vocabulary's one-time build and each grammar's compile time;
- the mask per token (GrammarState.allowed_tokens: llguidance's bitmask, unpacked to a bool array as
  wide as the logits) and the step (advance), along a walk that samples uniformly among the allowed
  tokens; "free_string" sits inside an unbounded JSON string, where ~123K tokens are allowed;
- sample() at temperature 1 on the model's logits, without a mask and with two masks (the sampler
  then sorts only the allowed tokens);
- decode per token as bench/run.py times it (engine.step + argmax), median of --repeats pieces;
- grammar_ms_per_token: the worst grammar's mask + advance, plus what the mask adds to sample(),
  over the decode time: the overhead figure;
- the whole generation loop (stream_text at temperature 1: sampling included) with and without a
  schema, and the difference per token;
- "overlap": the batch scheduler's step per generated token, greedy (argmax: the sampler costs next to
  nothing), without a grammar and, for each of two grammars, with the mask in line (computed before
  sampling) and overlapped (computed on the scheduler's worker thread while the next decode runs:
  Scheduler.overlap_masks), in turns; and the time sampling waited for each mask (the grammar's share
  of the critical path, from the scheduler's stats) over the decode time. Measured twice: with ggml on
  every core (the default), and with ggml on one core fewer ("overlap_spare_core": the mask thread
  then has a core of its own, as it has while a GPU decodes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mllama.generation.sampling import sample

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FREE_TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "score", "address"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                         "score": {"type": "integer", "minimum": 0, "maximum": 100},
                         "address": {"type": "object", "required": ["zip"], "additionalProperties": False,
                                     "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
GRAMMARS = {
    "free_string": {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": FREE_TEXT}}},
    "record_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": RECORD}}},
    "json_object": {"response_format": {"type": "json_object"}},
    "lark_list": {"grammar": 'start: item ("," item)*\nitem: /[a-z]{1,8}/ | /[0-9]{1,4}/'},
}


def ms(seconds: list[float]) -> dict:
    return {"median_ms": round(statistics.median(seconds) * 1e3, 4),
            "p90_ms": round(float(np.percentile(seconds, 90)) * 1e3, 4), "max_ms": round(max(seconds) * 1e3, 3)}


def mask_walk(model, grammar, steps: int, rng: np.random.Generator) -> dict:
    """Time allowed_tokens and advance along `steps` tokens drawn uniformly among the allowed ones."""
    state, masks, advances, allowed = grammar.start(), [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        mask = state.allowed_tokens()
        masks.append(time.perf_counter() - t0)
        ids = np.flatnonzero(mask)
        allowed.append(len(ids))
        token = int(rng.choice(ids))
        if token in model.eog_ids:
            state = grammar.start()
            continue
        t0 = time.perf_counter()
        state.advance(token)
        advances.append(time.perf_counter() - t0)
    return {"mask": ms(masks), "advance": ms(advances), "allowed_tokens_median": int(statistics.median(allowed))}


def sampling_costs(model, prompt: list[int], rng: np.random.Generator, repeats: int = 20) -> dict:
    """sample() on the model's logits at its default settings, without a mask and with the masks of a
    free string (~123K tokens allowed) and of a JSON record's start (a few allowed)."""
    logits = model.forward(prompt)[-1]
    params = model.sampling_params(temperature=1.0)
    masks = {"none": None}
    for name in ("free_string", "record_schema"):
        state = model.compile_grammar(**GRAMMARS[name]).start()
        for token in model.tokenize('{"text": "Lighthouses' if name == "free_string" else ""):
            state.advance(token)
        masks[name] = state.allowed_tokens()
    out = {}
    for name, mask in masks.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample(logits, [], params, rng, mask)
            times.append(time.perf_counter() - t0)
        out[name] = ms(times)
    return out


def decode_per_token(model, prompt: list[int], n: int, repeats: int) -> float:
    """Seconds per token of engine.step + argmax (bench/run.py's decode), median of the pieces."""
    engine = model.engine
    engine.state.tokens = []
    token = int(np.argmax(engine.evaluate(prompt, [])))
    pieces = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            token = int(np.argmax(engine.step(token, 0)))
        pieces.append((time.perf_counter() - t0) / n)
    return statistics.median(pieces)


def loop_per_token(model, prompt: list[int], n: int, seed: int, **constraint) -> float:
    """Seconds per generated token of the whole loop (stream_text at temperature 1)."""
    result = model.stream_text(prompt, temperature=1.0, top_p=1.0, seed=seed, max_tokens=n, **constraint).finish()
    return result.timings.generate_s / max(result.usage.completion_tokens - 1, 1)


def loop_costs(model, prompt: list[int], n: int, repeats: int) -> dict:
    """The loop with and without the free-string schema, run in turns (this machine's speed drifts)."""
    plain, constrained = [], []
    for seed in range(repeats):
        plain.append(loop_per_token(model, prompt, n, seed))
        constrained.append(loop_per_token(model, prompt, n, seed, **GRAMMARS["free_string"]))
    return {"unconstrained": statistics.median(plain), "free_string": statistics.median(constrained)}


def cpu_flags() -> list[str]:
    """The CPU's AVX-512 BF16 and AMX flags (lscpu / /proc/cpuinfo), for the record."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f == "avx512_bf16" or f.startswith("amx"))


def step_times(model, prompt: list[int], n: int, constraint: dict) -> tuple[list[float], float]:
    """(seconds between consecutive tokens: one scheduler step each, seconds sampling waited per mask) of
    one greedy generation."""
    stats = model.scheduler.stats
    masks, waited = stats["grammar_masks"], stats["grammar_mask_wait_s"]
    request = model.submit(prompt, temperature=0.0, max_tokens=n, **constraint)
    arrivals = [time.perf_counter() for kind, _ in model.events(request) if kind == "token"]
    wait = (stats["grammar_mask_wait_s"] - waited) / max(stats["grammar_masks"] - masks, 1)
    return list(np.diff(arrivals)), wait


def overlap_costs(model, prompt: list[int], n: int, repeats: int) -> dict:
    """Step time per token without a grammar, and with two grammars, the mask in line and overlapped, run
    in turns (the order rotating); medians over every step of every turn (robust to the other work on a
    shared machine). The mask's wait is put over the step without a grammar, measured in the same turns."""
    steps: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    modes = [("none", None, False)] + [(f"{g}_{m}", g, m == "overlapped") for g in ("lark_list", "free_string")
                                       for m in ("inline", "overlapped")]
    for turn in range(repeats):
        for label, grammar, overlap in modes[turn % len(modes):] + modes[:turn % len(modes)]:  # no mode always first
            model.scheduler.overlap_masks = overlap
            times, wait = step_times(model, prompt, n, GRAMMARS[grammar] if grammar else {})
            steps.setdefault(label, []).extend(times)
            waits.setdefault(label, []).append(wait)
    model.scheduler.overlap_masks = True
    plain = statistics.median(steps["none"])
    out: dict = {"step_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in steps.items()},
                 "steps_timed": {k: len(v) for k, v in steps.items()}, "mask_wait_ms": {}, "mask_wait_over_step": {}}
    for label, values in waits.items():
        if label != "none":
            out["mask_wait_ms"][label] = round(statistics.median(values) * 1e3, 4)
            out["mask_wait_over_step"][label] = round(statistics.median(values) / plain, 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small text dimensions")
    parser.add_argument("--steps", type=int, default=300, help="tokens of each mask walk")
    parser.add_argument("--decode", type=int, default=32, help="tokens per timed decode piece")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overlap-repeats", type=int, default=7, help="turns of the in-line/overlapped comparison")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/grammar.json)")
    args = parser.parse_args()

    import mllama
    from mllama.dev.synthetic_gguf import write_synthetic_gguf
    from run import configs, cpu_name

    text, _, _ = configs(args.quick)
    _, small_vision, _ = configs(True)
    result = {"machine": {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(),
                          "ggml": mllama.system_info(),
                          "load_average_at_start": os.getloadavg(), "mllama": mllama.__version__},
              "setup": {"text": {k: text[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                        "type": "q4_k_m", "steps": args.steps, "decode_tokens": args.decode, "repeats": args.repeats}}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_gguf(Path(tmp) / "grammar.gguf", text, small_vision, type="q4_k_m", vision_type="f16")
        with mllama.Model(path, device="cpu", n_ctx=256, n_image_slots=1) as model:
            result.update(measure(model, args))
        threads = (os.cpu_count() or 1) - 1
        if threads >= 1:
            with mllama.Model(path, device="cpu", n_ctx=256, n_image_slots=1, n_threads=threads) as model:
                prompt = [model.hparams.bos_token_id] + model.tokenize("Write a JSON object about lighthouses:")
                result["overlap_spare_core"] = {"n_threads": threads,
                                                **overlap_costs(model, prompt, args.decode, args.overlap_repeats)}
    result["machine"]["load_average_at_end"] = os.getloadavg()  # other work on the machine skews decode
    text_out = json.dumps(result, indent=2)
    print(text_out)
    out_path = args.out or HERE / "results" / ("grammar-quick.json" if args.quick else "grammar.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text_out + "\n")


def measure(model, args) -> dict:
    t0 = time.perf_counter()
    model.grammar_vocabulary.llg
    out: dict = {"vocabulary_build_s": round(time.perf_counter() - t0, 3), "n_tokens": model.tokenizer.n_vocab,
                 "grammars": {}}
    rng = np.random.default_rng(0)
    for name, spec in GRAMMARS.items():
        t0 = time.perf_counter()
        grammar = model.compile_grammar(**spec)
        out["grammars"][name] = {"compile_ms": round((time.perf_counter() - t0) * 1e3, 3),
                                 **mask_walk(model, grammar, args.steps, rng)}
    prompt = [model.hparams.bos_token_id] + model.tokenize("Write a JSON object about lighthouses:")
    out["sample"] = sampling_costs(model, prompt, rng)
    decode = decode_per_token(model, prompt, args.decode, args.repeats)
    loop = loop_costs(model, prompt, args.decode, args.repeats)
    worst_mask = max(g["mask"]["median_ms"] + g["advance"]["median_ms"] for g in out["grammars"].values())
    masked_sampling = out["sample"]["free_string"]["median_ms"] - out["sample"]["none"]["median_ms"]
    out["decode_ms_per_token"] = round(decode * 1e3, 3)
    out["grammar_ms_per_token"] = {"worst_mask_and_advance": round(worst_mask, 4),
                                   "sampling_with_the_mask": round(masked_sampling, 4),
                                   "over_decode": round((worst_mask + max(masked_sampling, 0)) / (decode * 1e3), 5)}
    out["loop_ms_per_token"] = {k: round(v * 1e3, 3) for k, v in loop.items()}
    difference = loop["free_string"] - loop["unconstrained"]
    out["loop_ms_per_token"]["difference_over_decode"] = round(difference / decode, 4)
    out["overlap"] = overlap_costs(model, prompt, args.decode, args.overlap_repeats)
    return out


if __name__ == "__main__":
    main()
