"""`mllama bench`: image encode time, prompt and decode tokens/s, time to first token and peak
memory of one model on this machine (`--json` for machines)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from ..image.preprocess import load_image
from .._native.errors import MllamaError
from .common import add_model_flags, load_model
from .demo import demo_image


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="image encode time, prompt and decode tokens/s, peak memory")
    add_model_flags(p)
    p.add_argument("--image", help="image to encode (default: a generated test image)")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--decode", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def measure(model, image, prompt: str, n_decode: int) -> dict:
    """Times of each stage on the model's engine (the warm-up pays for the graphs' first allocation)."""
    engine = model.engine
    hp = model.hparams
    prepared = model.prepare_images([image])
    engine.evaluate([hp.bos_token_id, hp.image_token_id], prepared)  # warm-up
    t0 = time.perf_counter()
    model.encode_image(image)
    encode_s = time.perf_counter() - t0
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    tokens, _ = model.chat_prompt(messages)
    engine.state.tokens, engine.slot_keys[:] = [], [None] * len(engine.slot_keys)
    cache, engine.image_cache = engine.image_cache, None  # the warm-up's image is not found again: encoded
    try:
        t0 = time.perf_counter()
        logits = engine.evaluate(tokens, model.prepare_images([image]))
        ttft = time.perf_counter() - t0
    finally:
        engine.image_cache = cache
    engine.state.tokens = []
    t0 = time.perf_counter()
    engine.evaluate(tokens, prepared)
    prompt_s = time.perf_counter() - t0
    token, n = int(np.argmax(logits)), 0
    t0 = time.perf_counter()
    while n < n_decode and len(engine.state.tokens) < engine.n_ctx:
        token = int(np.argmax(engine.step(token, 1)))
        n += 1
    decode_s = time.perf_counter() - t0
    return {"model": str(model.path), "device": model.info["device"], "threads": model.info["n_threads"],
            "image_encode_s": round(encode_s, 4), "prompt_tokens": len(tokens),
            "prompt_tok_s": round(len(tokens) / prompt_s, 2), "decode_tokens": n,
            "decode_tok_s": round(n / decode_s, 2) if decode_s > 0 else None,
            "time_to_first_token_s": round(ttft, 4), "peak_rss_bytes": peak_rss_bytes()}


def run(args: argparse.Namespace) -> int:
    image = load_image(args.image) if args.image else demo_image()
    with load_model(args) as model:
        result = measure(model, image, args.prompt, args.decode)
    if result["decode_tokens"] < args.decode:  # the context ran out: a decode speed of fewer tokens, or of none
        if not result["decode_tokens"]:
            raise MllamaError(f"the context ({model.n_ctx} tokens) leaves no room to decode after the prompt: "
                              "raise --ctx")
        print(f"mllama: warning: decoded {result['decode_tokens']} of {args.decode} tokens (the context is full)",
              file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} on {result['device']} ({result['threads']} threads)")
    print(f"  image encode        {result['image_encode_s']:.3f} s")
    print(f"  prompt              {result['prompt_tokens']} tokens, {result['prompt_tok_s']:.1f} tok/s")
    print(f"  decode              {result['decode_tokens']} tokens, {result['decode_tok_s'] or 0:.1f} tok/s")
    print(f"  time to first token {result['time_to_first_token_s']:.3f} s (image encode + prompt)")
    print(f"  peak memory         {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0
