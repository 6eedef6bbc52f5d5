"""Side-by-side: prompt processing and decode speed of the text decoder at the real 11B text
dimensions (a few layers, random weights), with one image in the cross-attention cache, mllama vs
transformers on the same machine in one run.

    python bench/text_decode.py [--layers 5] [--types f16,q4_k] [--prompt 64] [--decode 32] [--json OUT]

The vision tower is tiny (it is not timed); the text model has n_embd 4096, n_ff 14336, 32/8 heads,
the 128256-token vocabulary, and `--layers` layers with the last one a cross-attention layer.
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
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))

TEXT_11B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128004, "tie_word_embeddings": False, "hidden_act": "silu",
}


def time_mllama(gguf: Path, prompt: list[int], n_decode: int, pixels) -> dict:
    import mllama

    with mllama.Model(gguf, device="cpu", n_ctx=len(prompt) + n_decode + 8) as model:
        engine = model._engine
        images = [pixels]
        engine.evaluate(prompt[:8], images)  # warm-up, encodes the image into its slot
        engine.state.tokens = []
        t0 = time.perf_counter()
        logits = engine.evaluate(prompt, images)
        t_prompt = time.perf_counter() - t0
        token = int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(engine.step(token, 1)))
        t_decode = time.perf_counter() - t0
        return {"prompt_tok_s": len(prompt) / t_prompt, "decode_tok_s": n_decode / t_decode, "threads": model.info["n_threads"],
                "file_bytes": gguf.stat().st_size}


def time_transformers(cfg, prompt: list[int], n_decode: int, pixels, dtype_name: str) -> dict:
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from reference_inputs import hf_inputs_for  # noqa: E402  (bench helper below)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(**cfg)).to(dtype).eval()
    inputs = hf_inputs_for(prompt, pixels, dtype)
    with torch.inference_mode():
        model(**hf_inputs_for(prompt[:8], pixels, dtype))  # warm-up
        t0 = time.perf_counter()
        out = model(**inputs, use_cache=True)
        t_prompt = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        mask_row = inputs["cross_attention_mask"][:, -1:]
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(input_ids=token.view(1, 1), past_key_values=past, cross_attention_mask=mask_row, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        t_decode = time.perf_counter() - t0
    return {"prompt_tok_s": len(prompt) / t_prompt, "decode_tok_s": n_decode / t_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--types", default="f16,q4_k")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "text_decode.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    sys.path.insert(0, str(HERE))
    import mllama
    from mllama.synthetic import write_synthetic_checkpoint
    from tiny_checkpoint import VISION_CONFIG, build_checkpoint

    text = {**TEXT_11B, "num_hidden_layers": args.layers, "cross_attention_layers": [args.layers - 1]}
    vision = dict(VISION_CONFIG)
    rng = np.random.default_rng(0)
    prompt = [128000, 128256] + rng.integers(1000, 100000, args.prompt - 2).tolist()
    pixels = mllama.preprocess(np.zeros((56, 56, 3), np.uint8), {"size": {"height": 56, "width": 56}, "max_image_tiles": 4,
                                                                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    from mllama.engine import PreparedImage

    prepared = PreparedImage(pixels.pixel_values, pixels.aspect_ratio_id, pixels.n_tiles, "bench")
    result = {"benchmark": "text_decode", "layers": args.layers, "prompt_tokens": args.prompt, "decode_tokens": args.decode,
              "torch": torch.__version__, "cores": os.cpu_count(), "ggml": mllama.system_info(), "mllama": {}, "transformers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_checkpoint(tmp / "tok")
        write_synthetic_checkpoint(tmp / "hf", text, vision, tokenizer_from=tmp / "tok")
        for type_name in args.types.split(","):
            gguf = mllama.convert(tmp / "hf", tmp / f"m-{type_name}.gguf", type=type_name)
            result["mllama"][type_name] = time_mllama(gguf, prompt, args.decode, prepared)
            gguf.unlink()
    cfg = {"text_config": text, "vision_config": vision, "image_token_index": 128256}
    for dtype_name in (["bf16"] if args.skip_fp32 else ["fp32", "bf16"]):
        result["transformers"][dtype_name] = time_transformers(cfg, prompt, args.decode, pixels, dtype_name)
    bf16 = result["transformers"]["bf16"]
    result["ratios_vs_transformers_bf16"] = {t: {k: round(v[k] / bf16[k], 3) for k in ("prompt_tok_s", "decode_tok_s")}
                                            for t, v in result["mllama"].items()}
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
