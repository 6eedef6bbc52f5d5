"""A random-weight mllama GGUF of any size written DIRECTLY: no checkpoint, no torch and no
quantizer, so the full 11B (or 90B) at Q4_K_M takes about a minute and only the file's own disk
space. Quantized tensors are random blocks whose scale fields are set so that the weights have
the spread of a trained model's (std ~ 1/sqrt(row length), mean ~ 0); the metadata, names, types
and layout are exactly the converter's (same plan, same keys), so the runtime cannot tell the file
from a converted one. For benchmarks: speed does not depend on the values.

    python -m mllama.dev.synthetic_gguf out.gguf --preset 11b --type q4_k_m
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .._native import dtypes as T
from ..convert import file_metadata, plan
from ..convert.hf_config import metadata, read_config
from ..convert.tokenizer import read_tokenizer
from ..convert.writer import write_gguf
from .synthetic_checkpoint import hub_tensor_shapes, reference_preprocessor_config, write_llama3_tokenizer

TEXT_11B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
VISION_11B = {
    "hidden_size": 1280, "attention_heads": 16, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_global_layers": 8, "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680,
    "image_size": 560, "patch_size": 14, "max_num_tiles": 4, "num_channels": 3, "norm_eps": 1e-5, "hidden_act": "gelu",
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
PRESETS = {"11b": (TEXT_11B, VISION_11B)}
# Quantized block layouts: bytes per block, then (offset, std of the dequantized value per unit
# of the f16 scale at that offset) and, for the k-quants with a min, (offset, ratio min/scale)
# that centres the values. See ggml-common.h for the block structs.
_BLOCKS = {
    "q8_0": {"bytes": 34, "d": (0, 74.0)},                          # d, qs[32] int8
    "q4_k": {"bytes": 144, "d": (0, 258.0), "dmin": (2, 7.5)},      # d, dmin, scales[12], qs[128]
    "q5_k": {"bytes": 176, "d": (0, 527.0), "dmin": (2, 15.5)},     # d, dmin, scales[12], qh[32], qs[128]
    "q6_k": {"bytes": 210, "d": (208, 342.0), "scales": (192, 16)},  # ql[128], qh[64], scales[16] int8, d
}


@dataclass
class RandomSource:
    """Stands in for a checkpoint tensor: a shape, and random data already in the target type."""
    name: str
    shape: tuple[int, ...]
    seed: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def n_per_row(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.n_per_row

    def encoded_chunks(self, ti: T.TypeInfo, chunk_elements: int = 1 << 24) -> Iterator[bytes]:
        rng = np.random.default_rng(self.seed)
        scale = 1.0 if len(self.shape) <= 1 else 1.0 / float(np.sqrt(self.n_per_row))
        rows_per_chunk = max(1, chunk_elements // self.n_per_row)
        for start in range(0, self.n_rows, rows_per_chunk):
            n = min(rows_per_chunk, self.n_rows - start) * self.n_per_row
            yield _random_encoded(rng, ti.name.lower(), n, ti.block_size, scale)


def _random_encoded(rng: np.random.Generator, type_name: str, n: int, block: int, scale: float) -> bytes:
    if type_name in ("f32", "f16"):
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(scale)).astype(type_name.replace("f", "float")).tobytes()
    if type_name == "bf16":
        bits = (rng.standard_normal(n, dtype=np.float32) * np.float32(scale)).view(np.uint32)
        return ((bits + 0x8000) >> 16).astype(np.uint16).tobytes()
    layout = _BLOCKS.get(type_name)
    if layout is None:
        raise ValueError(f"no random writer for {type_name}")
    blocks = np.frombuffer(bytearray(rng.bytes((n // block) * layout["bytes"])), dtype=np.uint8).reshape(-1, layout["bytes"])
    d_off, spread = layout["d"]
    d = np.float16(scale / spread)
    blocks[:, d_off:d_off + 2] = np.frombuffer(d.tobytes(), np.uint8)
    if "dmin" in layout:
        m_off, ratio = layout["dmin"]
        blocks[:, m_off:m_off + 2] = np.frombuffer(np.float16(float(d) * ratio).tobytes(), np.uint8)
    if "scales" in layout:  # int8 sub-block scales kept in [-32, 31]
        s_off, count = layout["scales"]
        blocks[:, s_off:s_off + count] = (blocks[:, s_off:s_off + count].astype(np.int16) % 64 - 32).astype(np.int8).view(np.uint8)
    return blocks.tobytes()


def write_synthetic_gguf(path: str | os.PathLike, text: dict, vision: dict, *, type: str = "q4_k_m",
                         vision_type: str = "bf16", seed: int = 0) -> Path:
    """Write the GGUF for these configs (hub config.json sections) with random weights."""
    out = Path(path)
    with tempfile.TemporaryDirectory() as tmp:  # config + tokenizer files, read back as the converter does
        folder = Path(tmp)
        write_llama3_tokenizer(folder)
        config = {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama", "image_token_index": 128256,
                  "text_config": {"model_type": "mllama_text_model", **text},
                  "vision_config": {"model_type": "mllama_vision_model", **vision}}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "preprocessor_config.json").write_text(json.dumps(
            reference_preprocessor_config(vision["image_size"], vision["max_num_tiles"])))
        meta = metadata(read_config(folder), tok := read_tokenizer(folder))
    sources = {name: RandomSource(name, shape, seed + i) for i, (name, shape) in enumerate(hub_tensor_shapes(text, vision).items())}
    tensors = plan(sources, type.lower(), T.lookup(vision_type), int(meta["BLOCK_COUNT"]))
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        write_gguf(tmp_out, file_metadata(f"synthetic-{type.lower()}", type.lower(), meta, tok), tensors)
        os.replace(tmp_out, out)
    except BaseException:
        tmp_out.unlink(missing_ok=True)
        raise
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="write a random-weight mllama GGUF directly")
    parser.add_argument("output", type=Path)
    parser.add_argument("--preset", default="11b", choices=sorted(PRESETS))
    parser.add_argument("--type", default="q4_k_m")
    parser.add_argument("--vision-type", default="bf16", choices=["f32", "f16", "bf16"])
    parser.add_argument("--text-layers", type=int, default=None, help="keep only the first N text layers")
    args = parser.parse_args()
    text, vision = PRESETS[args.preset]
    if args.text_layers:
        text = {**text, "num_hidden_layers": args.text_layers,
                "cross_attention_layers": [i for i in text["cross_attention_layers"] if i < args.text_layers]}
    print(write_synthetic_gguf(args.output, text, vision, type=args.type, vision_type=args.vision_type))


if __name__ == "__main__":
    main()
