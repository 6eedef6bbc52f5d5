"""The shapes a chat's reply streams in: OpenAI's chunks of each choice as its events arrive (ChatChunks), a
chat's text pieces, and the checks and cleanups of the calls that stream them."""

from __future__ import annotations

from typing import Iterable, Iterator

from . import openai
from .request import Request
from .results import GenerationResult


def ends_of(request: Request) -> list:
    """How each choice of an ended request ended: its GenerationResult, or its exception."""
    return [next(v for k, v in s.events if k in ("result", "error")) for s in request.streams]


class ChatChunks:
    """The OpenAI chunks of a request's choices as its streams' events arrive, for a reader that runs the steps
    itself (Model.chat(stream=True)) or awaits them (Model.achat)."""

    def __init__(self, model, cid: str, created: int, request: Request):
        self.model, self.cid, self.created, self.request = model, cid, created, request
        self.pending = list(range(len(request.streams)))  # choices not ended yet
        self.held: dict[int, list[dict]] = {i: [] for i in self.pending}  # logprobs items not yet sent
        self.error: BaseException | None = None
        self.ended: list[GenerationResult] = []  # the results so far: the usage of all goes on the last one's chunk

    def first(self) -> list[dict]:
        return [openai.chunk(self.cid, self.created, self.model.name, {"role": "assistant", "content": ""}, None,
                             index=i) for i in self.pending]

    def ready(self) -> list[dict] | None:
        """The chunks of the events that arrived (None: none arrived, a step must run); an error ends it."""
        if not any(self.request.streams[i].events for i in self.pending):
            return None
        out: list[dict] = []
        for i in list(self.pending):
            out += self._choice(i)
            if self.error is not None:
                break
        return out

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _choice(self, i: int) -> list[dict]:
        events, held, out = self.request.streams[i].events, self.held[i], []
        name = self.model.name
        while events:
            kind, value = events.popleft()
            if kind == "logprob":
                held.append(value)
            elif kind == "text":
                out.append(openai.chunk(self.cid, self.created, name, {"content": value}, None, index=i,
                                        logprobs=openai.take(held)))
            elif kind == "error":
                self.pending.remove(i)
                self.error = value
                break
            elif kind == "result":
                self.pending.remove(i)
                self.ended.append(value)
                usage = {} if self.pending else {"usage": openai.usage_of(self.ended)}
                out.append(openai.chunk(self.cid, self.created, name, {}, value.finish_reason, index=i,
                                        logprobs=openai.take(held), **usage))
                break
        return out


def one_reply(sampling: dict, what: str) -> None:
    """A call that gives one reply takes no choices' count (TypeError rather than one choice of several kept)."""
    if "n" in sampling:
        raise TypeError(f"{what}: ask chat(..., n=N) for several")


def describe_messages(image, prompt: str, sampling: dict) -> list[dict]:
    """describe's one-turn chat; it gives one description, so the choices' count is not among its options."""
    one_reply(sampling, "describe gives one description")
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def content_pieces(chunks: Iterable[dict]) -> Iterator[str]:
    """The text pieces of a chat's stream of chunks (its one choice's content deltas); left early, the
    stream is closed (its request stopped at the next step)."""
    try:
        for chunk in chunks:
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    yield piece
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def cancel_unfinished(scheduler, request: Request) -> None:
    """A request whose stream of chunks was dropped unread: stopped at the next step, not generated for no one."""
    if any(not s.done for s in request.streams):
        scheduler.cancel(request)
