"""The raw binding (cffi, API mode), typed exceptions, and the handle base class.

Everything that talks to the C library goes through `call()`, which turns a status code and the
library's last-error text into a typed exception.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable

from ._mllama_cffi import ffi, lib

logger = logging.getLogger("mllama")


class MllamaError(RuntimeError):
    """Base class of every error raised by mllama; `status` is the C status name."""

    def __init__(self, message: str, status: str = "error"):
        super().__init__(message)
        self.status = status


class ModelLoadError(MllamaError):
    """A model file could not be loaded: missing, truncated, not mllama, a bad tensor, ..."""


class ConversionError(MllamaError):
    """A Hugging Face checkpoint could not be converted."""


class ModelClosedError(MllamaError):
    """The model was used after close()."""


def _status_name(status: int) -> str:
    return ffi.string(lib.mllama_status_name(status)).decode()


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


def abi_version() -> int:
    return int(lib.mllama_abi_version())


def native_version() -> str:
    return cstr(lib.mllama_version())


def system_info() -> str:
    buf = ffi.new("char[]", 4096)
    call(lib.mllama_system_info, buf, len(buf))
    return cstr(buf)


DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def devices() -> list[dict]:
    """The compute devices ggml offers (through its backend registry)."""
    out = []
    info = ffi.new("mllama_device_info *")
    for i in range(lib.mllama_device_count()):
        call(lib.mllama_device_get_info, i, info)
        out.append({
            "index": i,
            "name": cstr(info.name),
            "description": cstr(info.description),
            "type": DEVICE_TYPES.get(info.type, "unknown"),
            "memory_free": int(info.memory_free),
            "memory_total": int(info.memory_total),
        })
    return out


# --- logging: one C trampoline, the per-model Python logger passed as user data ------------------
_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


@ffi.def_extern()
def _mllama_log_trampoline(level, text, user_data):  # pragma: no cover - called from C
    try:
        sink = ffi.from_handle(user_data)
        sink.log(_LEVELS.get(level, logging.INFO), ffi.string(text).decode("utf-8", "replace"))
    except Exception:  # never let an exception cross into C
        pass


def log_level_for(py_logger: logging.Logger) -> int:
    """The C library's threshold for a Python logger; an unconfigured tree (level NOTSET) means WARNING,
    so that per-graph debug chatter costs nothing unless asked for."""
    level = py_logger.getEffectiveLevel()
    if level == logging.NOTSET:
        level = logging.WARNING
    if level <= logging.DEBUG:
        return lib.MLLAMA_LOG_DEBUG
    if level <= logging.INFO:
        return lib.MLLAMA_LOG_INFO
    if level <= logging.WARNING:
        return lib.MLLAMA_LOG_WARN
    return lib.MLLAMA_LOG_ERROR


class Handle:
    """Owns one C handle: idempotent close(), context manager, released at garbage collection."""

    def __init__(self, ptr, free: Callable[[], None]):
        """`free` releases `ptr` (and anything created from it); it runs once, at close() or GC."""
        self._ptr = ptr
        self._lock = threading.RLock()
        self._finalizer = weakref.finalize(self, free)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _handle(self):
        if self.closed:
            raise ModelClosedError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        with self._lock:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
