"""A streaming safetensors reader: tensors are read in row chunks with plain file reads (no mmap,
no torch), so converting a checkpoint never holds more than one chunk of it in memory.

Supports F32, F16 and BF16 sources (Meta's checkpoints are BF16, which numpy cannot represent:
BF16 rows are widened to float32 bit-exactly)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .._native.errors import ConversionError

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_per_row(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        return self.n_elements // max(1, self.n_per_row)

    def iter_rows(self, max_bytes: int) -> Iterator[np.ndarray]:
        """Yield float32 arrays of shape (rows, n_per_row) covering the tensor in order."""
        np_dtype, size = _DTYPES[self.dtype]
        row_bytes = self.n_per_row * size
        rows_per_chunk = max(1, max_bytes // max(1, self.n_per_row * 4))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            done = 0
            while done < self.n_rows:
                n = min(rows_per_chunk, self.n_rows - done)
                raw = f.read(n * row_bytes)
                if len(raw) != n * row_bytes:
                    raise ConversionError(f"{self.path}: tensor '{self.name}' is truncated")
                yield _to_f32(np.frombuffer(raw, dtype=np_dtype), self.dtype).reshape(n, self.n_per_row)
                done += n

    def read(self) -> np.ndarray:
        """The whole tensor as float32, in its own shape (for small tensors)."""
        rows = list(self.iter_rows(max(4, self.n_elements * 4)))
        return np.concatenate(rows).reshape(self.shape) if rows else np.zeros(self.shape, np.float32)


def _to_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def read_header(path: Path) -> dict[str, SourceTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ConversionError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{path} has a corrupt safetensors header: {exc}") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = meta.get("dtype")
        if dtype not in _DTYPES:
            raise ConversionError(f"{path}: tensor '{name}' has unsupported dtype {dtype} (F32, F16, BF16 supported)")
        begin, end = meta["data_offsets"]
        shape = tuple(int(d) for d in meta["shape"])
        t = SourceTensor(name, path, dtype, shape, base + begin, end - begin)
        if t.nbytes != t.n_elements * _DTYPES[dtype][1] or base + end > size:
            raise ConversionError(f"{path}: tensor '{name}' has inconsistent offsets (file truncated?)")
        out[name] = t
    return out


def open_checkpoint(folder: Path) -> dict[str, SourceTensor]:
    """All tensors of a Hugging Face folder: model.safetensors, else the shards of its index (transformers' order: a
    single-file save over a sharded one leaves the old index behind), else every .safetensors file. A tensor in two
    files is an error (which copy is meant is not known)."""
    index = folder / "model.safetensors.index.json"
    weight_map = None
    if (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif index.exists():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder} has no .safetensors files")
    tensors: dict[str, SourceTensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise ConversionError(f"{folder}: shard '{name}' named by the index is missing")
        for tensor_name, tensor in read_header(path).items():
            if tensor_name in tensors:
                raise ConversionError(f"{folder}: tensor '{tensor_name}' is in both {tensors[tensor_name].path.name} "
                                      f"and {name}")
            tensors[tensor_name] = tensor
    if weight_map is not None and set(tensors) - set(weight_map):
        missing = sorted(set(tensors) - set(weight_map))
        raise ConversionError(f"{index} does not list {len(missing)} tensor(s) of its shards, e.g. '{missing[0]}'")
    return tensors


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError("its weight_map's values are not file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"unreadable checkpoint index {index}: {exc!s:.200}") from None
    return weight_map
