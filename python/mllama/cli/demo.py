"""`mllama demo`: prove an install works end to end without any weights. Builds (once, cached in
the user cache folder) a small deterministic random-weight mllama GGUF with the real Llama 3
tokenizer, draws a test image, and describes it, timing each stage. The weights are random, so
the words are meaningless; every stage of the real pipeline runs."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .._native.errors import ModelLoadError
from .._version import __version__
from ..convert import convert
from ..dev.synthetic_checkpoint import reference_preprocessor_config, write_llama3_tokenizer, write_synthetic_checkpoint
from ..model import Model
from ..settings import cache_dir
from ..text.chat_template import default_template

DEMO_VERSION = 2
TEXT = {"vocab_size": 128256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "cross_attention_layers": [1, 3], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128004,
        "tie_word_embeddings": False, "hidden_act": "silu"}
VISION = {"hidden_size": 64, "attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 4, "num_global_layers": 2,
          "intermediate_layers_indices": [1, 3], "vision_output_dim": 192, "image_size": 112, "patch_size": 14,
          "max_num_tiles": 4, "num_channels": 3, "norm_eps": 1e-5, "hidden_act": "gelu"}
GENERATION = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
              "temperature": 0.6, "top_p": 0.9}


def build_demo_model(path: Path, progress: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mllama-demo-random"
        write_llama3_tokenizer(folder / "tok", default_template())
        (folder / "tok" / "preprocessor_config.json").write_text(json.dumps(reference_preprocessor_config(VISION["image_size"], VISION["max_num_tiles"])))
        (folder / "tok" / "generation_config.json").write_text(json.dumps(GENERATION))
        write_synthetic_checkpoint(folder, TEXT, VISION, tokenizer_from=folder / "tok", seed=DEMO_VERSION)
        convert(folder, path, type="f16", force=True, progress=progress)


def demo_image():
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 140, 140), fill=(230, 60, 40))
    draw.rectangle((180, 100, 290, 200), fill=(40, 80, 220))
    return image


def run_demo(quiet: bool = False) -> int:
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, file=sys.stderr))
    path = cache_dir() / f"demo-random-v{DEMO_VERSION}.gguf"
    t0 = time.perf_counter()
    if not path.exists():
        say(f"building the demo model (once) at {path} ...")
        path.parent.mkdir(parents=True, exist_ok=True)
        build_demo_model(path, progress=not quiet)
        say(f"  built in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    try:
        model = Model(path, n_ctx=512)
    except ModelLoadError as exc:  # a cached file of ours gone bad (a build cut off, a disk error): built again
        say(f"the cached demo model cannot be loaded ({exc}); building it again ...")
        build_demo_model(path, progress=not quiet)
        model = Model(path, n_ctx=512)
    with model:
        say(f"mllama {__version__}: loaded {path.name} in {time.perf_counter() - t0:.2f} s on {model.info['device']}")
        say("NOTE: the weights are random, so the words below are meaningless; this proves the pipeline runs.")
        image = demo_image()
        t0 = time.perf_counter()
        features = model.encode_image(image)
        say(f"  preprocess + vision encoder: {time.perf_counter() - t0:.3f} s -> features {tuple(features.shape)}")
        t0 = time.perf_counter()
        chat = model.chat_session(temperature=1.0, top_p=0.95, seed=0, max_tokens=24)
        reply = chat.send("Describe this image.", images=[image], stream=True)
        pieces = []
        for piece in reply:
            pieces.append(piece)
            if not quiet:
                sys.stdout.write(piece)
                sys.stdout.flush()
        end = time.perf_counter()
        print("" if not quiet else "".join(pieces))
        usage, timings = reply.result.usage, reply.result.timings
        say(f"  prompt {usage.prompt_tokens} tokens, time to first token {timings.prompt_s:.3f} s, "
            f"{usage.completion_tokens} tokens generated in {end - t0:.3f} s")
    say("demo OK")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a small random-weight model (no download)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the generated text")
    p.set_defaults(func=lambda args: run_demo(quiet=args.quiet))
