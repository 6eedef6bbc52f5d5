"""The server's side of the batch scheduler: requests are rendered and their images prepared in worker
threads, then submitted to the model's scheduler (a bounded wait beyond its n_seq_max sequences);
one driver thread runs the steps while there is work. Each choice of a request gets its own Reply:
its text pieces as they come, then its own GenerationResult."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from .._native.errors import GenerationCancelled
from ..generation.results import GenerationResult
from ..generation.request import Request, Stream
from .metrics import Metrics
from .requests import RequestError


class Reply:
    """The async stream of one choice's text pieces; `result` is set once it has ended normally.
    `held` gathers the logprobs items (when requested) of the tokens not yet sent."""

    def __init__(self, queue: "BatchQueue", request: Request, stream: Stream, wake: asyncio.Event):
        self.result: GenerationResult | None = None
        self.held: list[dict] = []
        self._queue, self._request, self._stream, self._wake = queue, request, stream, wake
        self._ended = False

    def __aiter__(self) -> "Reply":
        return self

    async def __anext__(self) -> str:
        while not self._ended:
            if not self._stream.events:
                self._wake.clear()
                if not self._stream.events:  # an event may have come between the check and the clear
                    await self._wake.wait()
                continue
            kind, value = self._stream.events.popleft()
            if kind == "text":
                return value
            if kind == "logprob":
                self.held.append(value)
            elif kind == "result":
                self.result, self._ended = value, True
                self._queue.metrics.finished(value)
            elif kind == "error":
                self._ended = True
                if not isinstance(value, GenerationCancelled):  # (those are counted as cancelled)
                    self._queue.metrics.failed.inc()
                raise value
        raise StopAsyncIteration

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
        """Stop the request (a client that went away): its sequences are freed at the next step. Counted once."""
        if self._request.cancelled:
            return
        if not self._ended or any(not s.ended for s in self._request.streams):
            self._queue.cancel(self._request)
            self._queue.metrics.cancelled.inc()


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its request has been stopped)."""


async def while_connected(request, awaitable, replies: list[Reply], poll_s: float = 0.25):
    """The value of `awaitable` (a coroutine over `replies`), polling the HTTP request for a disconnect meanwhile:
    a client that goes away while its request waits, prefills or generates a whole (non-streamed) answer stops it,
    and its sequences are freed at the next step (streamed answers learn of it from the response itself)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                await replies[0].aclose()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


async def first_pieces(replies: list[Reply]) -> list[str | None]:
    return [await reply.first() for reply in replies]


async def results(replies: list[Reply]) -> list[GenerationResult]:
    """Every choice's GenerationResult once all have ended."""
    try:
        for reply in replies:
            await reply.rest()  # the result holds the whole text, `first` included
    finally:
        await replies[0].aclose()
    return [reply.result for reply in replies]


class BatchQueue:
    def __init__(self, model, max_queue: int, metrics: Metrics | None = None):
        self.model, self.max_queue = model, max_queue
        self.metrics = metrics or Metrics(model)
        self.preparing = 0  # requests being rendered before they reach the scheduler's queue
        self._counts = threading.Lock()  # preparing: the event loop adds, the worker thread that queues subtracts
        self._work = threading.Event()
        self._driver: threading.Thread | None = None
        self.stopping = False  # the server shuts down: requests that come now are refused, or cancelled once queued
        self.metrics.preparing.set_function(lambda: self.preparing)

    def stop(self) -> None:
        """Stops every request, those being prepared and those to come included (a server shutting down: each
        answer under way ends with 503 "the request was cancelled"; one arriving after it had run normally)."""
        with self._counts:
            self.stopping = True
        self.model.scheduler.cancel_all()
        self._work.set()

    @property
    def waiting(self) -> int:
        """Requests that wait for a sequence, those being prepared included (the queue bound counts both)."""
        with self._counts:
            return self.model.scheduler.n_waiting + self.preparing

    async def submit(self, prompt: Callable[[Any], tuple[list[int], list]], sampling: dict, n: int = 1) -> list[Reply]:
        """Render the prompt (`prompt` gives the tokens and images from the model) and prepare its
        images in a worker thread, queue it, and return one Reply per choice. `sampling` holds
        Model.submit's keywords (sampling options, and response_format when constrained)."""
        if self.stopping:
            raise RequestError(503, "the server is shutting down")
        if self.waiting - self._free_sequences() >= self.max_queue:  # those that would wait for a sequence
            raise RequestError(503, "the server is busy: the wait queue is full", {"Retry-After": "1"})
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        with self._counts:
            self.preparing += 1
        request = await asyncio.to_thread(self._prepare, prompt, sampling, n,
                                          lambda: loop.call_soon_threadsafe(wake.set))
        self.metrics.submitted(request)
        self._start_driver()
        return [Reply(self, request, s, wake) for s in request.streams]

    def _prepare(self, prompt, sampling: dict, n: int, notify) -> Request:
        """In a worker thread: render, prepare the images, compile a constraint, queue the request (no longer
        `preparing` from the moment the scheduler counts it as waiting, under one lock: `waiting` never counts it
        twice, which refused requests before the queue was full)."""
        queued = False
        try:
            tokens, images = prompt(self.model)
            request = self.model.build_request(tokens, images, n=n, notify=notify, **sampling)
            with self._counts:
                if self.stopping:  # prepared while the server stopped: it ends at the next step
                    request.cancelled = True
                self.model.scheduler.submit(request)
                self.preparing, queued = self.preparing - 1, True
            return request
        finally:
            if not queued:
                with self._counts:
                    self.preparing -= 1

    def cancel(self, request: Request) -> None:
        self.model.scheduler.cancel(request)
        self._work.set()

    def _free_sequences(self) -> int:
        return sum(not busy for busy in self.model.scheduler.busy)

    def _start_driver(self) -> None:
        self._work.set()
        if self._driver is None or not self._driver.is_alive():
            self._driver = threading.Thread(target=self._drive, name="mllama-batch", daemon=True)
            self._driver.start()

    def _drive(self) -> None:
        """Steps while there is work; then sleeps until the next submit or cancel."""
        scheduler = self.model.scheduler
        while not self.model.closed:
            self._work.wait()
            self._work.clear()
            while scheduler.has_work() and not self.model.closed:
                try:
                    self.model.run_step()
                except BaseException as exc:  # not one request's fault: every request learns of it
                    scheduler.fail_all(exc)
                self.metrics.stepped(scheduler)
