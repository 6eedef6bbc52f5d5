"""The benchmark: mllama and transformers side by side on the same machine in one run, at the real
11B dimensions (random weights), written to JSON.

    python bench/run.py                    # about 10 minutes on 2 cores; writes bench/results/bench.json
    python bench/run.py --quick            # small dims, a sanity run of the whole pipeline (~1 minute)

Models: the text model at 11B dimensions with 5 layers (one cross-attention layer) + the full 11B
vision tower, as GGUF written directly (mllama.dev.synthetic_gguf: F16 and Q4_K_M text, BF16 vision) and
as transformers' MllamaForConditionalGeneration built from the same config (bf16; --fp32 adds fp32);
then the full 11B at Q4_K_M for the absolute decode speed against the memory-bandwidth roofline.
Each engine runs in its own process (bench/workers.py), so peak RSS is its own. Figures: vision
encode of a 4-tile image (--image-tiles: of smaller ones too), time to first token (image + 20-token
prompt, preprocessing included for mllama), prefill of 64 tokens, decode of 32 tokens with the image
in the cross-attention cache; the kernel path of each op group (`op_paths`) and the vision tower's
GFLOPS next to torch.matmul's on the same machine in the same run (`vision_arithmetic`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_probe(work: Path) -> Path | None:
    """bench/bandwidth.c compiled for this CPU (None without a C compiler with OpenMP)."""
    lib_path = work / "bandwidth.so"
    try:
        subprocess.run(["cc", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared",
                        str(HERE / "bandwidth.c"), "-o", str(lib_path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return lib_path


def read_bandwidth_gbs(probe: Path | None, gib: float = 2.0, passes: int = 5) -> tuple[float, str]:
    """Read bandwidth of all cores with the probe; torch's sum, which reads ~30% slower, only where
    no probe could be built."""
    if probe is not None:
        from workers import probe_bandwidth

        return probe_bandwidth(probe, gib, passes), "bench/bandwidth.c"
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        x = torch.zeros(int(gib * (1 << 30)) // 4)
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        return x.numel() * 4 / best / 1e9, "torch.sum"


def gpu_bandwidth_gbs(gib: float = 2.0, passes: int = 5) -> float:
    """A GPU's memory bandwidth: a device-to-device copy through torch, bytes read and written."""
    import torch

    x = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() / best / 1e9


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def worker(*args: str) -> dict:
    cmd = [sys.executable, str(HERE / "workers.py"), *args]
    print("  $", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(quick: bool) -> tuple[dict, dict, dict]:
    from mllama.dev.synthetic_gguf import TEXT_11B, VISION_11B

    if quick:
        text = {**TEXT_11B, "hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 8,
                "num_key_value_heads": 2, "num_hidden_layers": 2, "cross_attention_layers": [1]}
        vision = {**VISION_11B, "num_hidden_layers": 4, "num_global_layers": 1, "intermediate_layers_indices": [1, 3],
                  "vision_output_dim": 1280 * 3}
        return text, vision, text
    text = {**TEXT_11B, "num_hidden_layers": 5, "cross_attention_layers": [3]}
    return text, VISION_11B, TEXT_11B


def vision_tokens(vision: dict) -> int:
    """Rows of the tower for any image: every one of max_tiles tiles runs (reference §3), positions padded to 8."""
    positions = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return vision["max_num_tiles"] * ((positions + 7) // 8 * 8)


def vision_gflop(vision: dict) -> float:
    """The tower's matrix arithmetic for one image: per layer q, k, v, o and fc1, fc2 over every row,
    and the two attention products."""
    n = vision_tokens(vision)
    d, f = vision["hidden_size"], vision["intermediate_size"]
    layers = vision["num_hidden_layers"] + vision["num_global_layers"]
    return layers * (2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d) / 1e9


def add_vision_gflops(result: dict, vision: dict, dtypes: list[str], device: str = "cpu") -> None:
    """Vision GFLOPS of each engine next to torch.matmul's GFLOPS on the fc1 shape in each timed dtype,
    measured in this run (the machine's practical peak: oneDNN, AMX tiles where the CPU has them)."""
    from gemm import torch_ms

    n_tok = vision_tokens(vision)
    gflop = vision_gflop(vision)
    arithmetic = result["vision_arithmetic"] = {"gflop_per_image": round(gflop, 1)}
    mllama_gflops = gflop / result["mllama"]["q4_k_m"]["vision_s"]
    arithmetic["mllama_gflops"] = round(mllama_gflops, 1)
    for dtype in dtypes:
        ms = torch_ms(vision["hidden_size"], vision["intermediate_size"], n_tok, os.cpu_count() or 1, 3, dtype,
                      "cpu" if device == "cpu" else "cuda")
        peak = 2 * vision["hidden_size"] * vision["intermediate_size"] * n_tok / 1e9 / ms * 1e3
        arithmetic[f"torch_matmul_{dtype}_gflops"] = round(peak, 1)
        arithmetic[f"mllama_of_torch_matmul_{dtype}"] = round(mllama_gflops / peak, 3)
        ref_gflops = gflop / result["transformers"][dtype]["vision_s"]
        arithmetic[f"transformers_{dtype}_gflops"] = round(ref_gflops, 1)
        arithmetic[f"transformers_{dtype}_of_torch_matmul_{dtype}"] = round(ref_gflops / peak, 3)


def add_derived(entry: dict, bandwidth_gbs: float) -> None:
    """Roofline fraction of the decode speed and the RSS bound. Each timed piece of the decode is held against the
    higher of the bandwidths the worker measured right before and right after it, where it could (a VM's bandwidth
    drifts between minutes: 25-39 GB/s on the Zen 4 machine within an hour, and its memory switches between a
    ~35 and a ~60 GB/s state within a run); the fraction is the median piece's."""
    per_token = entry["decode_bytes_per_token"]
    probes = entry.get("read_bandwidth_gbs_around_decode", [])
    if len(probes) == len(entry["decode_runs_tok_s"]) + 1:
        rooflines = [max(before, after) * 1e9 / per_token for before, after in zip(probes, probes[1:])]
        fractions = [tok_s / roof for tok_s, roof in zip(entry["decode_runs_tok_s"], rooflines)]
        entry["decode_roofline_fractions"] = [round(f, 3) for f in fractions]
        roofline, fraction = statistics.median(rooflines), statistics.median(fractions)
    else:
        roofline = bandwidth_gbs * 1e9 / per_token
        fraction = entry["decode_tok_s"] / roofline
    entry["decode_roofline_tok_s"] = round(roofline, 2)
    entry["decode_roofline_fraction"] = round(fraction, 3)
    mem = entry["memory"]
    bound = entry["file_bytes"] + mem["kv_cache"] + mem["image_slots"] + mem["compute"]
    entry["rss_bound_bytes"] = bound
    entry["peak_rss_over_bound"] = round(entry["peak_rss"] / bound, 3)
    entry["load_s_per_gb"] = round(entry["load_s"] / (entry["file_bytes"] / 1e9), 3)


def ratios(result: dict, dtype: str) -> dict:
    """mllama Q4_K_M (and F16) against transformers in `dtype`: time ratios (< 1: mllama faster) and speed
    ratios (> 1: mllama faster)."""
    ref = result["transformers"][dtype]
    ours = result["mllama"]["q4_k_m"]
    return {
        "vision_time": round(ours["vision_s"] / ref["vision_s"], 3),
        **{f"vision_time_{n}_tiles": round(ours["vision_s_by_tiles"][n] / ref["vision_s_by_tiles"][n], 3)
           for n in ours.get("vision_s_by_tiles", {}) if n in ref.get("vision_s_by_tiles", {})},
        "ttft": round(ours["ttft_s"] / ref["ttft_s"], 3),
        **{f"prefill_speed_{t}": round(result["mllama"][t]["prefill_tok_s"] / ref["prefill_tok_s"], 3) for t in ("q4_k_m", "f16")},
        **{f"decode_speed_{t}": round(result["mllama"][t]["decode_tok_s"] / ref["decode_tok_s"], 3) for t in ("q4_k_m", "f16")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small dimensions: a fast check of the pipeline")
    parser.add_argument("--fp32", action="store_true", help="also time transformers in fp32")
    parser.add_argument("--transformers", default=None,
                        help="comma list of transformers dtypes to time (default bf16, with --fp32 bf16,fp32): on a CPU "
                             "without AVX-512 BF16, torch's bf16 matmul is several times slower than its fp32 one, "
                             "and fp32 is the fair reference there")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size 11B Q4_K_M decode")
    parser.add_argument("--image-tiles", default="",
                        help="comma list of tile counts (1-3): also time the encode of images that small, in both "
                             "engines (every image runs max_tiles tiles; ours skip the padding x padding pairs the mask "
                             "hides)")
    parser.add_argument("--device", default="cpu",
                        help="where both engines run: cpu, or a ggml GPU device (CUDA0) for mllama and cuda for transformers")
    parser.add_argument("--work", type=Path, default=None, help="folder for the GGUF files (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/bench.json)")
    args = parser.parse_args()
    dtypes = args.transformers.split(",") if args.transformers else ["bf16"] + (["fp32"] if args.fp32 else [])
    extra_tiles = ["--extra-tiles", args.image_tiles] if args.image_tiles else []
    if not dtypes or set(dtypes) - {"bf16", "fp32"}:
        parser.error(f"--transformers takes bf16 and/or fp32, not {args.transformers!r}")
    out_path = args.out or HERE / "results" / ("bench-quick.json" if args.quick else "bench.json")

    import mllama
    from mllama._native.cpu_features import cpu_report
    from mllama.dev.synthetic_gguf import write_synthetic_gguf

    text, vision, full_text = configs(args.quick)
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "ggml": mllama.system_info(), **cpu_report(),
                          "python": platform.python_version(), "mllama": mllama.__version__},
              "setup": {"text_layers": text["num_hidden_layers"], "vision_layers": [vision["num_hidden_layers"], vision["num_global_layers"]],
                        "prompt_tokens": 64, "ttft_prompt_tokens": 20, "decode_tokens": 32, "repeats": 3, "image_tiles": 4, "quick": args.quick},
              "mllama": {}, "transformers": {}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        print("measuring read bandwidth", flush=True)
        on_gpu = args.device != "cpu"
        probe_lib = None if on_gpu else build_probe(tmp)
        bw, probe = (gpu_bandwidth_gbs(), "torch device-to-device copy") if on_gpu else read_bandwidth_gbs(probe_lib)
        result["machine"].update(read_bandwidth_gbs=round(bw, 1), bandwidth_probe=probe, device=args.device)
        probe_args = (["--bandwidth-probe", str(probe_lib)] if probe_lib else []) + ["--device", args.device]
        for type_name in ("q4_k_m", "f16"):
            print(f"mllama {type_name}", flush=True)
            path = write_synthetic_gguf(tmp / f"{type_name}.gguf", text, vision, type=type_name, vision_type="bf16")
            extra = extra_tiles if type_name == "q4_k_m" else []  # the same BF16 tower in both files
            result["mllama"][type_name] = entry = worker("mllama", str(path), "--image", *probe_args, *extra)
            add_derived(entry, bw)
            path.unlink()
        cfg = tmp / "config.json"
        cfg.write_text(json.dumps({"text_config": text, "vision_config": vision, "image_token_index": 128256}))
        for dtype in dtypes:
            print(f"transformers {dtype}", flush=True)
            result["transformers"][dtype] = worker("transformers", str(cfg), "--dtype", dtype,
                                                   "--device", "cuda" if on_gpu else "cpu", *extra_tiles)
        if not args.skip_full:
            print("mllama full 11B q4_k_m", flush=True)
            path = write_synthetic_gguf(tmp / "full.gguf", full_text, vision, type="q4_k_m", vision_type="bf16")
            result["mllama"]["full_11b_q4_k_m"] = entry = worker("mllama", str(path), "--image", "--decode", "8", "--repeats", "5",
                                                                     *probe_args)
            add_derived(entry, bw)
    add_vision_gflops(result, vision, dtypes, args.device)
    for dtype in dtypes:
        result[f"ratios_vs_transformers_{dtype}"] = ratios(result, dtype)
    text_out = json.dumps(result, indent=2)
    print(text_out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
