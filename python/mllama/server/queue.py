"""One generation at a time, in a worker thread; requests wait in a bounded queue. Each request gets
its own Reply: its text pieces as they come, then its own GenerationResult."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from ..generation.results import GenerationResult
from .requests import RequestError

_DONE = object()


class Reply:
    """The async stream of one request's text pieces; `result` is set once it has ended normally."""

    def __init__(self, queue: asyncio.Queue, cancel: threading.Event):
        self.result: GenerationResult | None = None
        self._queue, self._cancel = queue, cancel

    def __aiter__(self) -> "Reply":
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _DONE:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, GenerationResult):
            self.result = item
            return await self.__anext__()
        return item

    async def first(self) -> str | None:
        """The first piece (None for an empty reply): pulled before answering, so that early errors
        (a bad image, a prompt over the context) become HTTP errors."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    async def rest(self) -> str:
        return "".join([piece async for piece in self])

    async def aclose(self) -> None:
        """Stop the generation (a client that went away): the worker stops at its next piece."""
        self._cancel.set()


class GenerationQueue:
    def __init__(self, model, max_queue: int):
        self.model = model
        self.max_queue = max_queue
        self.waiting = 0
        self._lock: asyncio.Lock | None = None

    async def _acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._lock.locked() and self.waiting >= self.max_queue:
            raise RequestError(503, "the server is busy: the wait queue is full", {"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    async def submit(self, prompt: Callable[[Any], tuple[list[int], list]], sampling: dict) -> Reply:
        """Wait for the model, start the generation in a worker thread, return its Reply. `prompt`
        gives the tokens and images from the model (in the worker: rendering is part of the work);
        `sampling` holds stream_text's keywords (sampling options, and response_format when constrained)."""
        await self._acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reply = Reply(queue, threading.Event())
        threading.Thread(target=self._work, args=(loop, queue, reply._cancel, prompt, sampling),
                         name="mllama-generate", daemon=True).start()
        return reply

    def _work(self, loop, queue: asyncio.Queue, cancel: threading.Event, prompt, sampling: dict) -> None:
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        try:
            tokens, images = prompt(self.model)
            stream = self.model.stream_text(tokens, self.model.prepare_images(images), **sampling)
            for piece in stream:
                if cancel.is_set():
                    stream.close()
                    break
                put(piece)
            if stream.result is not None:
                put(stream.result)
        except BaseException as exc:  # delivered to the request
            put(exc)
        finally:
            put(_DONE)
            loop.call_soon_threadsafe(self._lock.release)
