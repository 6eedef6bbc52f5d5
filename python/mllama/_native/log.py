"""The C library's log messages into Python logging: one C trampoline, the per-model Python logger
passed as user data."""

from __future__ import annotations

import logging

from .ffi import ffi, lib

logger = logging.getLogger("mllama")

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


LOG_CALLBACK = lib._mllama_log_trampoline
