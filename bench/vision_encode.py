"""Side-by-side: one 4-tile image through the vision encoder at the real 11B vision dimensions
(random weights), mllama vs transformers on the same machine in one run.

    python bench/vision_encode.py [--layers 32 --global-layers 8] [--vision-type f16|bf16|f32] [--json OUT]

mllama: the converted GGUF's vision tower (+ projector and cross K/V, which transformers does not
run here: a slight disadvantage for mllama). transformers: MllamaVisionModel in fp32 and bf16,
sdpa attention, torch threads = the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))

VISION_11B = {
    "hidden_size": 1280, "attention_heads": 16, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_global_layers": 8, "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680,
    "image_size": 560, "patch_size": 14, "max_num_tiles": 4, "num_channels": 3, "norm_eps": 1e-5, "hidden_act": "gelu",
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
TEXT_SMALL = {  # the text model is not timed; small so the GGUF stays small
    "vocab_size": 128256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "cross_attention_layers": [1], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128004,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def time_mllama(gguf: Path, pixels: np.ndarray, repeats: int) -> tuple[float, dict]:
    import mllama

    with mllama.Model(gguf, device="cpu") as model:
        model.encode_pixels(pixels, 6, 4)  # warm-up (allocations, page-in)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.encode_pixels(pixels, 6, 4)
            times.append(time.perf_counter() - t0)
        return min(times), {"threads": model.info["n_threads"], "ggml": mllama.system_info()}


def time_transformers(vision_cfg: dict, pixels: np.ndarray, dtype_name: str, repeats: int) -> float:
    import torch
    from transformers import MllamaVisionConfig, MllamaVisionModel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    model = MllamaVisionModel(MllamaVisionConfig(**vision_cfg)).to(dtype).eval()
    args = dict(pixel_values=torch.from_numpy(pixels[None, None]).to(dtype), aspect_ratio_ids=torch.tensor([[6]]),
                aspect_ratio_mask=torch.ones(1, 1, 4, dtype=torch.long))
    times = []
    with torch.inference_mode():
        model(**args)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**args)
            times.append(time.perf_counter() - t0)
    del model
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--global-layers", type=int, default=8)
    parser.add_argument("--vision-type", default="f16", choices=["f32", "f16", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-fp32", action="store_true", help="time transformers in bf16 only")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "vision_encode.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from mllama.synthetic import write_synthetic_checkpoint
    from tiny_checkpoint import build_checkpoint

    import mllama

    vision = {**VISION_11B, "num_hidden_layers": args.layers, "num_global_layers": args.global_layers,
              "intermediate_layers_indices": [i for i in VISION_11B["intermediate_layers_indices"] if i < args.layers]
              or [args.layers - 1]}
    vision["vision_output_dim"] = vision["hidden_size"] * (len(vision["intermediate_layers_indices"]) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_checkpoint(tmp / "tok")  # tokenizer files (the tiny model itself is not used)
        write_synthetic_checkpoint(tmp / "hf", TEXT_SMALL, vision, tokenizer_from=tmp / "tok")
        gguf = mllama.convert(tmp / "hf", tmp / "v.gguf", type="f16", vision_type=args.vision_type)
        pixels = np.random.default_rng(0).standard_normal((4, 3, 560, 560)).astype(np.float32)
        ours, runtime = time_mllama(gguf, pixels, args.repeats)
    result = {"benchmark": "vision_encode_4_tiles", "vision_layers": args.layers, "global_layers": args.global_layers,
              "mllama_vision_type": args.vision_type, "mllama_s": round(ours, 3), **runtime,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count()}
    for dtype_name in (["bf16"] if args.skip_fp32 else ["fp32", "bf16"]):
        t = time_transformers(vision, pixels, dtype_name, args.repeats)
        result[f"transformers_{dtype_name}_s"] = round(t, 3)
        result[f"ratio_vs_transformers_{dtype_name}"] = round(ours / t, 3)
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
