"""`mllama bench`: image encode time, prompt and decode tokens/s, time to first token and peak
memory of one model on this machine (`--json` for machines)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cmd_bench(args: argparse.Namespace) -> int:
    from .cli_chat import load_model
    from .demo import demo_image
    from .preprocess import load_image

    image = load_image(args.image) if args.image else demo_image()
    with load_model(args) as model:
        engine = model._engine
        prepared = model._prepare_images([image])
        engine.evaluate([model.hparams_cached["bos_token_id"], model.hparams_cached["image_token_id"]], prepared)  # warm-up
        t0 = time.perf_counter()
        model.encode_image(image)
        encode_s = time.perf_counter() - t0
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
        tokens, _ = model.chat_prompt(messages)
        engine.state.tokens, engine.slot_keys[0] = [], None
        t0 = time.perf_counter()
        logits = engine.evaluate(tokens, model._prepare_images([image]))
        ttft = time.perf_counter() - t0
        engine.state.tokens = []
        t0 = time.perf_counter()
        engine.evaluate(tokens, prepared)
        prompt_s = time.perf_counter() - t0
        token, n = int(np.argmax(logits)), 0
        t0 = time.perf_counter()
        while n < args.decode and len(engine.state.tokens) < engine.n_ctx:
            token = int(np.argmax(engine.step(token, 1)))
            n += 1
        decode_s = time.perf_counter() - t0
        result = {"model": str(model.path), "device": model.info["device"], "threads": model.info["n_threads"],
                  "image_encode_s": round(encode_s, 4), "prompt_tokens": len(tokens),
                  "prompt_tok_s": round(len(tokens) / prompt_s, 2), "decode_tokens": n,
                  "decode_tok_s": round(n / decode_s, 2) if decode_s > 0 else None,
                  "time_to_first_token_s": round(ttft, 4), "peak_rss_bytes": peak_rss_bytes()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} on {result['device']} ({result['threads']} threads)")
        print(f"  image encode        {result['image_encode_s']:.3f} s")
        print(f"  prompt              {result['prompt_tokens']} tokens, {result['prompt_tok_s']:.1f} tok/s")
        print(f"  decode              {n} tokens, {result['decode_tok_s'] or 0:.1f} tok/s")
        print(f"  time to first token {result['time_to_first_token_s']:.3f} s (image encode + prompt)")
        print(f"  peak memory         {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0
