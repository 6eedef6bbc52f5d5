"""GGUF key and tensor names, read from the C library's table (csrc/gguf/names.h) so that the converter
writes exactly the names the loader reads. There is no second copy of the table in Python."""

from __future__ import annotations

from functools import lru_cache

from .ffi import call, cstr, ffi, lib


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, str], dict[str, str]]:
    keys: dict[str, str] = {}
    tensors: dict[str, str] = {}
    entry = ffi.new("mllama_name_entry *")
    for i in range(lib.mllama_name_count()):
        call(lib.mllama_name_get, i, entry)
        (tensors if entry.is_tensor else keys)[cstr(entry.id)] = cstr(entry.name)
    return keys, tensors


def keys() -> dict[str, str]:
    """ID -> GGUF key, e.g. "VOCAB_SIZE" -> "mllama.vocab_size"."""
    return dict(_tables()[0])


def tensors() -> dict[str, str]:
    """ID -> tensor name pattern, e.g. "ATTN_Q" -> "blk.%d.attn_q.weight"."""
    return dict(_tables()[1])


def key(key_id: str) -> str:
    return _tables()[0][key_id]


def tensor(tensor_id: str, layer: int | None = None) -> str:
    pattern = _tables()[1][tensor_id]
    if "%d" in pattern:
        if layer is None:
            raise ValueError(f"tensor {tensor_id} needs a layer index")
        return pattern % layer
    return pattern
