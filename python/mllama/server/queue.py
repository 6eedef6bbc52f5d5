"""The server's side of the batch scheduler: requests are rendered and their images prepared in worker
threads, then submitted to the model's scheduler (a bounded wait beyond its n_seq_max sequences);
one driver thread runs the steps while there is work. Each choice of a request gets its own Reply:
its text pieces as they come, then its own GenerationResult."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from ..generation.results import GenerationResult
from ..generation.scheduler import Request, Stream
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
        """Stop the request (a client that went away): its sequences are freed at the next step."""
        if not self._ended or any(not s.done for s in self._request.streams):
            self._queue.cancel(self._request)
            self._queue.metrics.cancelled.inc()


class BatchQueue:
    def __init__(self, model, max_queue: int, metrics: Metrics | None = None):
        self.model, self.max_queue = model, max_queue
        self.metrics = metrics or Metrics(model)
        self.preparing = 0  # requests being rendered before they reach the scheduler's queue
        self._work = threading.Event()
        self._driver: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return self.model.scheduler.n_waiting + self.preparing

    async def submit(self, prompt: Callable[[Any], tuple[list[int], list]], sampling: dict, n: int = 1) -> list[Reply]:
        """Render the prompt (`prompt` gives the tokens and images from the model) and prepare its
        images in a worker thread, queue it, and return one Reply per choice. `sampling` holds
        Model.submit's keywords (sampling options, and response_format when constrained)."""
        if self.waiting - self._free_sequences() >= self.max_queue:  # those that would wait for a sequence
            raise RequestError(503, "the server is busy: the wait queue is full", {"Retry-After": "1"})
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        self.preparing += 1
        try:
            request = await asyncio.to_thread(self._prepare, prompt, sampling, n,
                                              lambda: loop.call_soon_threadsafe(wake.set))
        finally:
            self.preparing -= 1
        self.metrics.submitted(request)
        self._start_driver()
        return [Reply(self, request, s, wake) for s in request.streams]

    def _prepare(self, prompt, sampling: dict, n: int, notify) -> Request:
        """In a worker thread: render, prepare the images, compile a constraint, queue the request."""
        tokens, images = prompt(self.model)
        return self.model.submit(tokens, images, n=n, notify=notify, **sampling)

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
