"""A model's hyperparameters as a frozen dataclass. Its scalar fields are the fields of the C struct
`mllama_hparams` (csrc/include/mllama.h), taken from the binding at import time, so Python never
mirrors the struct by hand; the integer lists the ABI returns separately are added as tuples."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._native.ffi import ffi

_C_FIELDS = ffi.typeof("mllama_hparams").fields
_LISTS = [("cross_attention_layers", tuple), ("intermediate_layers", tuple), ("aspect_ratios", tuple)]


def _python_type(ctype) -> type:
    if ctype.kind == "array":
        return tuple
    return float if ctype.cname in ("float", "double") else int


HParams = dataclasses.make_dataclass(
    "HParams", [(name, _python_type(field.type)) for name, field in _C_FIELDS] + _LISTS, frozen=True,
    namespace={"__doc__": "Hyperparameters read from the model file (text decoder, vision encoder, special token ids)."
                          " Field names are those of the C struct mllama_hparams.",
               "__module__": __name__,
               "as_dict": lambda self: dataclasses.asdict(self)})


def from_struct(h, lists: dict[str, Any]) -> "HParams":
    """HParams from a `mllama_hparams *` and the list fields."""
    values = {}
    for name, field in _C_FIELDS:
        value = getattr(h, name)
        values[name] = tuple(float(x) for x in value) if field.type.kind == "array" else _python_type(field.type)(value)
    return HParams(**values, **{name: tuple(lists[name]) for name, _ in _LISTS})


__all__ = ["HParams", "from_struct"]
