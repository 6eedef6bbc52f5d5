"""Ctrl-C during a scheduler step, raised once the step is over. A KeyboardInterrupt raised in the middle of
a step (between admitting a request and marking its sequence busy, between evaluating a batch and sampling
every stream of it) would leave the scheduler's state half-changed: a stream that never gets its token, a
sequence or an image slot held for good. Python delivers SIGINT to the main thread only, so that is where
it is deferred: the step completes, then the caller gets the KeyboardInterrupt and stops its own request.
A handler other than Python's default one (installed by the program, a web server's) is left alone."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def deferred_interrupts():
    """Within the block, a first SIGINT is recorded instead of raised and KeyboardInterrupt is raised at its end;
    a second one is raised at once (a long step can still be cut short)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []

    def on_sigint(signum, frame):
        if received:  # a second Ctrl-C: at once, as without this (the step's own fallbacks keep it whole)
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
