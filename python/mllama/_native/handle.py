"""The base class of objects that own a C handle."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable

from .errors import MllamaError, ModelClosedError


EXIT_WAIT_S = 30.0  # how long a free waits for a step under way in another thread (a daemon thread at exit)


def _free_when_idle(lock: threading.RLock, free: Callable[[], None]) -> None:
    """Runs `free` holding the object's lock, so never under a step of another thread (the finalizer ran at
    interpreter exit while a daemon thread generated, or at garbage collection, and freed the context under its
    decode: SIGSEGV). A step that does not end within EXIT_WAIT_S leaves the memory to the process's end."""
    if not lock.acquire(timeout=EXIT_WAIT_S):
        return
    try:
        free()
    finally:
        lock.release()


class Handle:
    """Owns one C handle: idempotent close(), context manager, released at garbage collection. Calls that run
    outside `_lock` (metadata, weights) hold the handle with `using()`: close() waits for them, so that no thread
    is inside the C library when it frees the handle (that crashed the interpreter)."""

    def __init__(self, ptr, free: Callable[[], None]):
        """`free` releases `ptr` (and anything created from it); it runs once, at close() or GC."""
        self._ptr = ptr
        self._lock = threading.RLock()
        self._finalizer = weakref.finalize(self, _free_when_idle, self._lock, free)
        self._users, self._closing = 0, False
        self._users_changed = threading.Condition()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _handle(self):
        if self.closed:
            raise ModelClosedError(f"{type(self).__name__} is closed")
        return self._ptr

    @contextmanager
    def using(self):
        """The handle, which stays open until the block ends (ModelClosedError when it is closed already)."""
        entered = False  # counted in the same try that uncounts it: an interrupt (Ctrl-C) in between leaks nothing
        try:
            with self._users_changed:
                if self._closing:
                    raise ModelClosedError(f"{type(self).__name__} is closed")
                ptr = self._handle()
                self._users, entered = self._users + 1, True  # one line: nothing can come in between
            yield ptr
        finally:
            if entered:
                with self._users_changed:
                    self._users -= 1
                    self._users_changed.notify_all()

    def _stepping_here(self) -> bool:
        """Whether this thread is inside work that needs the handle (a subclass's step), holding the lock."""
        return False

    def close(self) -> None:
        with self._lock, self._users_changed:
            if self._stepping_here():
                raise MllamaError(f"{type(self).__name__}.close() was called inside a step (a notify callback?): "
                                  "close it once the step has returned")
            self._closing = True  # no new users: the ones inside finish, then the handle goes
            while self._users:
                self._users_changed.wait()
            self._finalizer()

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} cannot be pickled or copied (it owns native memory): share the one "
                        "object, threads may")

    def __copy__(self):
        self.__reduce__()

    def __deepcopy__(self, memo):
        self.__reduce__()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
