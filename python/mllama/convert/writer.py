"""Stream a GGUF file: header, metadata and tensor infos through the `gguf` package, then each
tensor's data chunk by chunk (quantized by ggml), into a temporary file renamed into place only
when complete."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from .._native import dtypes as T
from .safetensors import SourceTensor

CHUNK_BYTES = 16 * 1024 * 1024  # float32 bytes converted at once


@dataclass
class PlannedTensor:
    name: str            # GGUF name
    source: SourceTensor
    type: T.TypeInfo

    @property
    def nbytes(self) -> int:
        return self.source.n_rows * self.type.row_bytes(self.source.n_per_row)


def add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"cannot store {type(value).__name__} under {key}")


def _pad(fout, alignment: int) -> None:
    pad = (-fout.tell()) % alignment
    if pad:
        fout.write(b"\0" * pad)


def _encoded(src, ti: T.TypeInfo) -> Iterator[tuple[bytes, int]]:
    """(bytes in the target type, float32 bytes they stand for), chunk by chunk."""
    if hasattr(src, "encoded_chunks"):  # a source that makes its data in the target type itself
        for data in src.encoded_chunks(ti):
            yield data, len(data)
        return
    for rows in src.iter_rows(CHUNK_BYTES):
        yield T.encode(rows, ti), rows.size * 4


def _write_tensor(fout, planned: PlannedTensor, on_bytes: Callable[[int], None]) -> None:
    written = 0
    for data, n_source_bytes in _encoded(planned.source, planned.type):
        fout.write(data)
        written += len(data)
        on_bytes(n_source_bytes)
    if written != planned.nbytes:
        raise RuntimeError(f"wrote {written} bytes for {planned.name}, planned {planned.nbytes}")


def write_gguf(path: Path, metadata: Iterable[tuple[str, Any]], tensors: list[PlannedTensor],
               on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write the whole file to `path` (which the caller renames into place)."""
    writer = GGUFWriter(path, arch="mllama")
    for key, value in metadata:
        if key == "general.architecture":
            continue  # written by GGUFWriter itself
        add_metadata(writer, key, value)
    for t in tensors:
        writer.add_tensor_info(t.name, t.source.shape or (1,), np.dtype(np.float32), t.nbytes,
                               raw_dtype=GGMLQuantizationType(t.type.id))
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    alignment = writer.data_alignment
    try:
        for t in tensors:
            _pad(fout, alignment)
            _write_tensor(fout, t, on_bytes)
        _pad(fout, alignment)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()
