"""One measurement per process (so peak RSS is that engine's own), printed as one JSON line.

    python bench/workers.py mllama MODEL.gguf --prompt 64 --decode 32 [--image]
    python bench/workers.py transformers CONFIG.json --dtype bf16 --prompt 64 --decode 32
    python bench/workers.py ENGINE MODEL --serve    # bench/paired.py's: one timing per request line (serve_*)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
IMAGE_TOKEN = 128256


def peak_rss() -> int:
    """The process's peak resident memory, as `mllama bench` measures it (portable: getrusage)."""
    from mllama.cli.bench import peak_rss_bytes

    return peak_rss_bytes()


def probe_bandwidth(lib_path: str | Path, gib: float = 1.0, passes: int = 3) -> float:
    """GB/s read by all cores (bench/bandwidth.c, built by run.py)."""
    import ctypes

    lib = ctypes.CDLL(str(lib_path))
    lib.read_bandwidth_gbs.restype = ctypes.c_double
    lib.read_bandwidth_gbs.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    return lib.read_bandwidth_gbs(int(gib * (1 << 30)), passes, os.cpu_count() or 1)


def probe_in_child(lib_path: str) -> float:
    """The probe in a process of its own: its buffer must not count in this process's peak RSS."""
    import subprocess

    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from workers import probe_bandwidth; print(probe_bandwidth({lib_path!r}, 2.0, 5))"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


# height x width of the noise image that preprocessing cuts into this many 560-px tiles (at most 4)
IMAGE_SHAPES = {1: (560, 560), 2: (560, 1120), 3: (560, 1680), 4: (1120, 1120)}


def bench_image(tiles: int = 4) -> np.ndarray:
    """Noise of IMAGE_SHAPES[tiles]: 1120 x 1120 is 4 tiles (aspect ratio 2 x 2), 560 x 560 one."""
    return np.random.default_rng(0).integers(0, 256, (*IMAGE_SHAPES[tiles], 3), dtype=np.uint8)


def prompts(n_prompt: int, n_ttft: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(0)
    body = rng.integers(1000, 100000, max(n_prompt, n_ttft)).tolist()
    return [128000, IMAGE_TOKEN] + body[:n_prompt - 2], [128000, IMAGE_TOKEN] + body[:n_ttft - 2]


def run_mllama(args) -> dict:
    import mllama
    from mllama.generation.engine import PreparedImage

    t0 = time.perf_counter()
    mllama.Model(args.model, device=args.device).close()  # warms the page cache
    cold_or_warm = time.perf_counter() - t0
    prompt, ttft_prompt = prompts(args.prompt, args.ttft_prompt)
    t0 = time.perf_counter()
    model = mllama.Model(args.model, device=args.device, n_ctx=args.prompt + args.decode * args.repeats + 16, n_image_slots=1)
    out = {"load_s": time.perf_counter() - t0, "first_load_s": cold_or_warm, "threads": model.info["n_threads"],
           "file_bytes": model.info["file_size"]}
    engine = model.engine
    images: list = []
    if args.image:  # time to first token: preprocess + vision + cross K/V + prompt + first logits
        t0 = time.perf_counter()
        pre = mllama.preprocess(bench_image(), model)
        prepared = PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, "bench")
        t1 = time.perf_counter()
        engine.encode(0, prepared)
        t2 = time.perf_counter()
        int(np.argmax(engine.evaluate(ttft_prompt, [prepared])))
        out.update(ttft_s=time.perf_counter() - t0, vision_s=t2 - t1, n_tiles=pre.n_tiles)
        images = [prepared]
    else:
        prompt = [t for t in prompt if t != IMAGE_TOKEN]
    engine.evaluate(prompt, images)  # warm-up at the timed shape
    runs = []
    for _ in range(args.repeats):
        engine.state.tokens = []
        t0 = time.perf_counter()
        token = int(np.argmax(engine.evaluate(prompt, images)))
        runs.append(len(prompt) / (time.perf_counter() - t0))
    out.update(prefill_runs_tok_s=runs, prefill_tok_s=statistics.median(runs))
    # The machine's bandwidth drifts (a shared VM's memory switches between states within minutes): it is
    # measured before the first piece of the decode and after each, so that each piece has a roofline of its own
    # (bench/run.py's add_derived).
    probes = [round(probe_in_child(args.bandwidth_probe), 1)] if args.bandwidth_probe else []
    runs = []
    for _ in range(args.repeats):  # one generation, timed in pieces
        t0 = time.perf_counter()
        for _ in range(args.decode):
            token = int(np.argmax(engine.step(token, len(images))))
        runs.append(args.decode / (time.perf_counter() - t0))
        if args.bandwidth_probe:
            probes.append(round(probe_in_child(args.bandwidth_probe), 1))
    out.update(decode_runs_tok_s=runs, decode_tok_s=statistics.median(runs))
    if probes:
        out.update(read_bandwidth_gbs_around_decode=probes, read_bandwidth_gbs_at_decode=probes[0],
                   read_bandwidth_gbs_after_decode=probes[-1])
    out["memory"] = model.memory()
    out["decode_bytes_per_token"] = decode_bytes(model, out["memory"], len(images))
    for tiles in args.extra_tiles:  # images of fewer tiles: their padding rows skip the padding tiles' keys
        pre = mllama.preprocess(bench_image(tiles), model)
        assert pre.n_tiles == tiles, (pre.n_tiles, tiles)
        t0 = time.perf_counter()
        engine.encode(0, PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, f"bench-{tiles}"))
        out.setdefault("vision_s_by_tiles", {})[str(tiles)] = time.perf_counter() - t0
    out["tensor_types"] = sorted({t.type for t in model.tensors()})
    out["op_paths"] = model.op_paths()
    model.close()
    out["peak_rss"] = peak_rss()
    return out


def decode_bytes(model, memory: dict, n_images: int) -> int:
    """Bytes one decode step must read: every text weight except the embedding table (one row) and
    the cross-attention K/V projections (their output is cached), plus the image's cross K/V; with no image,
    not the cross-attention layers' weights either (the decoder skips those layers, as the reference does)."""
    skip = ("token_embd.weight", "cross_attn_k_proj", "cross_attn_v_proj")
    text = [t for t in model.tensors() if not t.name.startswith(("v.", "mm.")) and not any(s in t.name for s in skip)]
    if not n_images:
        cross_layers = {t.name.split(".")[1] for t in text if ".cross_attn_" in t.name}
        text = [t for t in text if not (t.name.startswith("blk.") and t.name.split(".")[1] in cross_layers)]
    return sum(t.nbytes for t in text) + (memory["image_slots"] if n_images else 0)


PREPROCESS_560 = {"size": {"height": 560, "width": 560}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                  "image_std": [0.26862954, 0.26130258, 0.27577711]}


def vision_timer(model, sync) -> dict:
    """Hooks that time transformers' image encode, vision tower + projector, as in mllama's figure (which also holds
    the cross-attention K/V projections that transformers runs inside its prefill: our side does more work): the
    returned dict gets v0, v1 (perf_counter) and the projector's output (states) at each forward with an image."""
    captured = {}

    def started(*_) -> None:  # a pre-hook's return value would replace the inputs
        sync()
        captured["v0"] = time.perf_counter()

    def projected(module, inputs, output):
        sync()
        captured.update(states=output, v1=time.perf_counter())

    model.model.vision_model.register_forward_pre_hook(started)
    model.model.multi_modal_projector.register_forward_hook(projected)
    return captured


def prefill_inputs(model, states, prompt: list[int], pre, dtype, device) -> dict:
    """transformers' inputs for a prefill of prompt with the image's projected states given (no vision run)."""
    from reference_inputs import hf_inputs_for

    inputs = hf_inputs_for(prompt, pre, dtype, device)
    inputs.pop("pixel_values"), inputs.pop("aspect_ratio_ids")
    states = states.reshape(-1, states.shape[-2], model.config.text_config.hidden_size)  # as MllamaModel does
    return {**inputs, "cross_attention_states": states}


def run_transformers(args) -> dict:
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    import mllama
    from reference_inputs import hf_inputs_for

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = json.loads(Path(args.model).read_text())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:  # built where it runs (a GPU initializes the random weights in a moment)
        model = MllamaForConditionalGeneration(MllamaConfig(**cfg)).to(dtype).eval()
    out = {"build_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name()}
    prompt, ttft_prompt = prompts(args.prompt, args.ttft_prompt)
    pre = mllama.preprocess(bench_image(), {**PREPROCESS_560, "max_image_tiles": 4})
    captured = vision_timer(model, sync)
    with torch.inference_mode():
        t0 = time.perf_counter()
        int(model(**hf_inputs_for(ttft_prompt, pre, dtype, device)).logits[0, -1].argmax())
        out.update(ttft_s=time.perf_counter() - t0, vision_s=captured["v1"] - captured["v0"])
        inputs = prefill_inputs(model, captured["states"], prompt, pre, dtype, device)
        model(**inputs)  # warm-up at the timed shape
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = model(**inputs, use_cache=True)
            sync()
            runs.append(len(prompt) / (time.perf_counter() - t0))
        out.update(prefill_runs_tok_s=runs, prefill_tok_s=statistics.median(runs))
        past, token = res.past_key_values, res.logits[0, -1].argmax()
        mask_row = inputs["cross_attention_mask"][:, -1:]
        runs = []
        for _ in range(args.repeats):  # one generation, timed in pieces
            t0 = time.perf_counter()
            for _ in range(args.decode):
                res = model(input_ids=token.view(1, 1), past_key_values=past, cross_attention_mask=mask_row, use_cache=True)
                past, token = res.past_key_values, res.logits[0, -1].argmax()
            sync()
            runs.append(args.decode / (time.perf_counter() - t0))
        out.update(decode_runs_tok_s=runs, decode_tok_s=statistics.median(runs))
        for tiles in args.extra_tiles:  # vision + projector of images of fewer tiles
            pre_n = mllama.preprocess(bench_image(tiles), {**PREPROCESS_560, "max_image_tiles": 4})
            model(**hf_inputs_for(ttft_prompt, pre_n, dtype, device))
            out.setdefault("vision_s_by_tiles", {})[str(tiles)] = captured["v1"] - captured["v0"]
    out["peak_rss"] = peak_rss()
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def serve_mllama(args) -> None:
    """bench/paired.py's mllama side: the model loaded once, then per line on stdin ("image" or "prefill") one
    timed piece, printed as a JSON line (the image encode as in run_mllama; a prefill of --prompt tokens with the
    image in the cross-attention cache)."""
    import mllama
    from mllama.generation.engine import PreparedImage

    prompt, _ = prompts(args.prompt, args.ttft_prompt)
    with mllama.Model(args.model, device=args.device, n_ctx=args.prompt + 16, n_image_slots=1) as model:
        engine = model.engine
        pre = mllama.preprocess(bench_image(), model)
        served, encoded = 0, None
        print(json.dumps({"ready": True, "threads": model.info["n_threads"]}), flush=True)
        for line in sys.stdin:
            request = line.strip()
            if request not in ("image", "prefill"):
                break
            if request == "image" or encoded is None:  # a new name each time: encoded again, never found cached
                served += 1
                encoded = PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, f"paired-{served}")
                t0 = time.perf_counter()
                engine.encode(0, encoded)
                if request == "image":
                    print(json.dumps({"vision_s": time.perf_counter() - t0}), flush=True)
                    continue
            engine.state.tokens = []
            t0 = time.perf_counter()
            int(np.argmax(engine.evaluate(prompt, [encoded])))
            print(json.dumps({"prefill_tok_s": len(prompt) / (time.perf_counter() - t0)}), flush=True)


def serve_transformers(args) -> None:
    """bench/paired.py's transformers side, as serve_mllama: the image encode timed as in run_transformers (the
    tower and projector, inside a forward of the 20-token prompt), the prefill with the image's states given."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    import mllama
    from reference_inputs import hf_inputs_for

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(**json.loads(Path(args.model).read_text()))).to(dtype).eval()
    prompt, ttft_prompt = prompts(args.prompt, args.ttft_prompt)
    pre = mllama.preprocess(bench_image(), {**PREPROCESS_560, "max_image_tiles": 4})
    captured = vision_timer(model, lambda: None)
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            request = line.strip()
            if request not in ("image", "prefill"):
                break
            if request == "image" or "states" not in captured:
                model(**hf_inputs_for(ttft_prompt, pre, dtype, torch.device("cpu")))
            if request == "image":
                print(json.dumps({"vision_s": captured["v1"] - captured["v0"]}), flush=True)
                continue
            inputs = prefill_inputs(model, captured["states"], prompt, pre, dtype, torch.device("cpu"))
            t0 = time.perf_counter()
            model(**inputs, use_cache=True)
            print(json.dumps({"prefill_tok_s": len(prompt) / (time.perf_counter() - t0)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["mllama", "transformers"])
    parser.add_argument("model", help="GGUF file (mllama) or config JSON (transformers)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--ttft-prompt", type=int, default=20)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills and decode pieces; the median is reported")
    parser.add_argument("--image", action="store_true")
    parser.add_argument("--device", default="cpu", help="mllama: a ggml device name (CUDA0); transformers: cpu or a GPU")
    parser.add_argument("--bandwidth-probe", default=None, help="bandwidth.so built by run.py")
    parser.add_argument("--extra-tiles", type=lambda v: [int(t) for t in v.split(",") if t], default=[],
                        help="comma list of tile counts (1-3) whose image encode is timed too, after the rest")
    parser.add_argument("--serve", action="store_true", help="timings on request, one per stdin line (bench/paired.py)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.serve:
        return serve_mllama(args) if args.engine == "mllama" else serve_transformers(args)
    result = run_mllama(args) if args.engine == "mllama" else run_transformers(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
