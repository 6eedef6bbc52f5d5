"""The image cache on bench/run.py's model (11B dimensions, 5 text layers of which one cross-attention,
the full vision tower; Q4_K_M text, BF16 vision): one 4-tile image encoded (vision tower, projector and
cross K/V, then kept in the cache), against the same image from the memory cache, and from the disk
cache in a fresh Model. Writes bench/results/image_cache.json.

    python bench/image_cache.py            # writes the ~3 GB synthetic model to a temp folder first
    python bench/image_cache.py --quick    # small dimensions
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
sys.path.insert(0, str(HERE))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(path: Path, cache_dir: Path, image: np.ndarray, repeats: int) -> dict:
    import mllama

    out: dict = {}
    with mllama.Model(path, image_cache_dir=cache_dir) as model:
        out["preprocess_and_key_s"] = timed(lambda: model.prepare_images([image]))
        prepared = model.prepare_images([image])[0]
        engine, cache = model.engine, model.image_cache
        out["miss_encode_and_store_s"] = timed(lambda: engine.encode(0, prepared))
        out["store_s"] = timed(lambda: cache.store_from(engine.ctx, 0, prepared.key))
        out["memory_hit_s"] = sorted(timed(lambda: engine.encode(0, prepared)) for _ in range(repeats))[repeats // 2]
        out["blob_bytes"] = cache.nbytes
        assert engine.n_encoded == 1 and cache.stats.memory_hits == repeats
    with mllama.Model(path, image_cache_dir=cache_dir, image_cache_bytes=0) as model:
        out["disk_hit_fresh_model_s"] = timed(lambda: model.engine.encode(0, prepared))
        assert model.engine.n_encoded == 0 and model.image_cache.stats.disk_hits == 1
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small dimensions")
    parser.add_argument("--work", type=Path, default=None, help="folder for the GGUF file (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "image_cache.json")
    args = parser.parse_args()

    import mllama
    from mllama.dev.synthetic_gguf import write_synthetic_gguf
    from run import configs, cpu_name

    text, vision, _ = configs(args.quick)
    side = 2 * vision["image_size"]  # a square image of 2x2 tiles
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "ggml": mllama.system_info(),
                          "python": platform.python_version()},
              "setup": {"text_layers": text["num_hidden_layers"], "cross_layers": len(text["cross_attention_layers"]),
                        "image_tiles": 4, "quick": args.quick}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = write_synthetic_gguf(Path(tmp) / "q4_k_m.gguf", text, vision, type="q4_k_m", vision_type="bf16")
        result["q4_k_m"] = measure(path, Path(tmp) / "cache", image, repeats=5)
    text_out = json.dumps(result, indent=2)
    print(text_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
