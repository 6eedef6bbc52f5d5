"""ggml tensor types, from the C library (ggml's own type table and quantizer)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import ConversionError
from .ffi import call, cstr, ffi, lib

F32, F16, BF16 = 0, 1, 30


@dataclass(frozen=True)
class TypeInfo:
    id: int
    name: str
    block_size: int
    type_size: int
    is_quantized: bool
    can_quantize: bool

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    def fits(self, n_per_row: int) -> bool:
        return n_per_row % self.block_size == 0


@lru_cache(maxsize=None)
def all_types() -> dict[str, TypeInfo]:
    """Lower-case type name -> info, for every type this ggml build has."""
    out = {}
    info = ffi.new("mllama_type_info *")
    for t in range(lib.mllama_type_count()):
        if lib.mllama_type_get_info(t, info) != lib.MLLAMA_OK:
            continue
        ti = TypeInfo(t, cstr(info.name), int(info.block_size), int(info.type_size),
                      bool(info.is_quantized), bool(info.can_quantize))
        out[ti.name.lower()] = ti
    return out


def by_id(type_id: int) -> TypeInfo:
    for ti in all_types().values():
        if ti.id == type_id:
            return ti
    raise KeyError(type_id)


def writable_type_names() -> list[str]:
    return sorted(n for n, t in all_types().items() if t.can_quantize)


def lookup(name: str) -> TypeInfo:
    ti = all_types().get(name.lower())
    if ti is None or not ti.can_quantize:
        raise ConversionError(f"unknown or unwritable tensor type '{name}' (choose from {', '.join(writable_type_names())})")
    return ti


def encode(rows: np.ndarray, ti: TypeInfo) -> bytes:
    """Encode float32 rows (n_rows, n_per_row) as type `ti` with ggml's quantizer."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if ti.id == F32:
        return rows.tobytes()
    n_rows, n_per_row = rows.shape
    out = bytearray(n_rows * ti.row_bytes(n_per_row))
    written = ffi.new("uint64_t *")
    call(lib.mllama_quantize, ti.id, ffi.from_buffer("float[]", rows), n_rows, n_per_row,
         ffi.from_buffer(out), len(out), written, error=ConversionError)
    return bytes(out)


def decode(data: bytes, ti: TypeInfo, n_elements: int) -> np.ndarray:
    """Decode `n_elements` values of type `ti` to float32 with ggml's own dequantizer."""
    out = np.empty(n_elements, dtype=np.float32)
    call(lib.mllama_dequantize, ti.id, ffi.from_buffer(data), len(data), ffi.from_buffer("float[]", out), n_elements)
    return out
