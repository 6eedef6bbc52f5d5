"""One request to the batch scheduler: its prompt, and a Stream per choice (n > 1) with that choice's
sampling state, text so far (stop strings held back and cut) and outbox of events for its readers."""

from __future__ import annotations

import time
import weakref
from collections import deque
from typing import Callable

import numpy as np

from ..text.tokenizer import StreamDecoder
from .constrain import Grammar
from .engine import PreparedImage
from .results import GenerationResult, RunRecord, Timings, Usage
from .sampling import SamplingParams, find_stop


class Stream:
    """One choice of a request: its sequence, sampling state, text and outbox of events
    (("text", str), ("result", GenerationResult), ("error", exception))."""

    def __init__(self, request: "Request", index: int, tokenizer):
        self._request, self.index = weakref.ref(request), index  # no cycle: a finished request is freed at once
        seed = request.params.seed
        self.rng = np.random.default_rng(None if seed is None else (seed + index) % 2**64)  # any int seed
        self.seq = -1
        self.history = list(request.tokens)
        self.next_token: int | None = None  # sampled, evaluated at the next step
        self.record = RunRecord(prompt_tokens=len(request.tokens))
        self.decoder = StreamDecoder(tokenizer, skip_special=request.params.skip_special_tokens)
        self.pending, self.text = "", []
        self.tokenizer = tokenizer
        self.logprobs: list[dict] | None = [] if request.logprobs is not None else None  # OpenAI's items
        self.grammar = request.grammar.start() if request.grammar is not None else None  # its own state
        self.events: deque = deque()
        self.done = False   # set once the result (or error) is in `events`
        self.ended = False  # set just before it goes there

    @property
    def request(self) -> "Request":
        """The request of this stream (alive while the scheduler or a reader holds it)."""
        return self._request()

    def emit(self, kind: str, value) -> None:
        if kind in ("result", "error"):  # before it can be read: a reader of the result finds the stream ended
            self.ended = True
        self.events.append((kind, value))
        if self.request.notify:
            self.request.notify()

    def push_text(self, token: int, stops) -> bool:
        """Adds a token's text; True when a stop string ended the stream (a special token that gives no text
        still stops it when a stop string is its name: "<|start_header_id|>", as clients of Llama 3 send)."""
        if self.decoder.skips(token) and self.tokenizer.token_bytes(token).decode() in stops:
            return True
        self.pending += self.decoder.push(token)
        cut, hold = find_stop(self.pending, stops)
        if cut >= 0:
            self.pending = self.pending[:cut]
            return True
        if len(self.pending) > hold:
            self._send(self.pending[:len(self.pending) - hold])
            self.pending = self.pending[len(self.pending) - hold:]
        return False

    def _send(self, piece: str) -> None:
        self.text.append(piece)
        self.emit("text", piece)

    def finish(self, reason: str) -> None:
        if reason != "stop_string":
            self.pending += self.decoder.flush()
            cut, _ = find_stop(self.pending, self.request.params.stop)
            if cut >= 0:
                self.pending, reason = self.pending[:cut], "stop"
        self.record.finish_reason = "stop" if reason == "stop_string" else reason
        if self.pending:
            self._send(self.pending)
        self.emit("result", result_of("".join(self.text), self.record, self.logprobs))
        self.done = True  # after the result is in the outbox: a reader that finds the stream done finds its result


class Request:
    """A prompt (tokens and prepared images) to answer with n choices."""

    def __init__(self, tokens: list[int], images: list[PreparedImage], params: SamplingParams, tokenizer,
                 n: int = 1, notify: Callable[[], None] | None = None, grammar: Grammar | None = None,
                 logprobs: int | None = None):
        if not tokens:
            raise ValueError("cannot evaluate an empty prompt")
        if n < 1:
            raise ValueError("n must be at least 1")
        self.tokens, self.images, self.params, self.notify = list(tokens), list(images), params, notify
        self.grammar = grammar
        self.logprobs = logprobs  # None: off; else how many alternatives to report per token
        self.streams = [Stream(self, i, tokenizer) for i in range(n)]
        self.slots: list[int] = []
        self.to_encode: list[tuple[int, PreparedImage]] = []  # (slot, image) still to run through the vision tower
        self.n_evaluated = 0          # prompt tokens in the first stream's cache
        self.cancelled = False
        self.submitted = time.perf_counter()

    @property
    def in_prefill(self) -> bool:
        return self.n_evaluated < len(self.tokens)

    def fail(self, exc: BaseException) -> None:
        for s in self.streams:
            if not s.done:
                s.emit("error", exc)
                s.done = True


def result_of(text: str, record: RunRecord, logprobs: list[dict] | None = None) -> GenerationResult:
    end = time.perf_counter()
    first = record.first_token if record.first_token is not None else end
    started = record.started or first
    return GenerationResult(text, record.finish_reason, Usage(record.prompt_tokens, record.completion_tokens),
                            Timings(prompt_s=first - started, generate_s=end - first), logprobs)
