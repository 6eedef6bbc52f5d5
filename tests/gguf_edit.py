"""Test helper: rewrite a GGUF file with changes (drop/reshape/retype a tensor, change a key), to
build corrupt-but-parseable model files for the loader's error paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter


def _field_value(field) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub


def rewrite(src: Path, dst: Path, *, drop: set[str] = frozenset(), keys: dict[str, Any] | None = None,
            drop_keys: set[str] = frozenset(),
            tensor_fn: Callable[[str, np.ndarray, GGMLQuantizationType], tuple[np.ndarray, GGMLQuantizationType]] | None = None) -> Path:
    """Copy `src` to `dst`, dropping tensors/keys, overriding keys (value, or (value, type)), and
    passing each kept tensor through tensor_fn(name, data, type) -> (data, type)."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch=keys.get("general.architecture", arch) if keys else arch)
    keys = dict(keys or {})
    keys.pop("general.architecture", None)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys:
            continue
        if name in keys:
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for name, value in keys.items():
        if isinstance(value, tuple):
            writer.add_key_value(name, value[0], value[1])
        elif isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        else:
            writer.add_float32(name, value)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data, ttype = np.array(t.data), t.tensor_type
        if tensor_fn is not None:
            data, ttype = tensor_fn(t.name, data, ttype)
        if ttype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(t.name, data, raw_dtype=ttype)
        else:
            writer.add_tensor(t.name, data, raw_shape=data.shape if data.dtype != np.uint8 else None, raw_dtype=ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
