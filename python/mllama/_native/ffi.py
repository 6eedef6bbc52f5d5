"""The raw binding (cffi, API mode) and `call()`, through which everything that talks to the C
library goes: it turns a status code and the library's last-error text into a typed exception."""

from __future__ import annotations

from typing import Any, Callable

from .._mllama_cffi import ffi, lib
from .errors import MllamaError


def _status_name(status: int) -> str:
    return ffi.string(lib.mllama_status_name(status)).decode()


def is_backend_error(exc: BaseException) -> bool:
    """Whether an exception is the C library's MLLAMA_ERR_BACKEND (a device or an RPC worker failed)."""
    return isinstance(exc, MllamaError) and exc.status == _status_name(lib.MLLAMA_ERR_BACKEND)


def last_error() -> str:
    return ffi.string(lib.mllama_last_error()).decode("utf-8", "replace")


def call(fn: Callable[..., int], *args: Any, error: type[MllamaError] = MllamaError, context: str = "") -> None:
    """Call a status-returning C function; raise `error` with the library's reason on failure."""
    status = fn(*args)
    if status != lib.MLLAMA_OK:
        reason = last_error() or _status_name(status)
        if status == lib.MLLAMA_ERR_INVALID_ARGUMENT and error is MllamaError:
            raise ValueError(f"{context}{reason}")
        raise error(f"{context}{reason}", _status_name(status))


def cstr(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")


def struct_to_dict(cdata) -> dict:
    """The fields of a C struct (or a pointer to one) as a dict; char arrays as str, float arrays as lists."""
    ctype = ffi.typeof(cdata)
    fields = ctype.item.fields if ctype.kind == "pointer" else ctype.fields
    out = {}
    for name, field in fields:
        value = getattr(cdata, name)
        if field.type.kind == "array":
            value = [float(x) for x in value] if field.type.item.cname == "float" else cstr(value)
        out[name] = value
    return out


__all__ = ["call", "cstr", "ffi", "last_error", "lib", "struct_to_dict"]
