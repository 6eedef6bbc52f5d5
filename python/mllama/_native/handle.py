"""The base class of objects that own a C handle."""

from __future__ import annotations

import threading
import weakref
from typing import Callable

from .errors import ModelClosedError


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
