"""What one generation returns: its text, why it stopped, its token counts and its timings. Each
request gets its own objects; nothing about a request is left on the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from .._native.errors import GenerationCancelled


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Timings:
    prompt_s: float    # from admission to a sequence (time queued excluded) to the first sampled token: images, prompt
    generate_s: float  # from the first sampled token to the end

    def tokens_per_s(self, completion_tokens: int) -> float:
        """Generation speed after the first token (the first one costs prompt_s)."""
        return max(completion_tokens - 1, 0) / self.generate_s if self.generate_s > 0 else 0.0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop": an end-of-generation token or a stop string; "length": max_tokens or n_ctx
    usage: Usage
    timings: Timings
    logprobs: list[dict] | None = field(default=None, hash=False)  # OpenAI's items, one per token, when asked


@dataclass
class RunRecord:
    """Filled in while one request's tokens are generated (private to that request)."""
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"
    started: float = 0.0
    first_token: float | None = None


class TextStream:
    """The text of one generation as it is produced: iterate for the pieces; once the iteration
    has finished, `result` holds the GenerationResult (None while running or after close())."""

    def __init__(self, produce: Callable[["TextStream"], Iterator[str]]):
        self.result: GenerationResult | None = None
        self._pieces = produce(self)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop the generation (the model is free again)."""
        self._pieces.close()

    def finish(self) -> GenerationResult:
        """Run to the end and return the result (GenerationCancelled once the stream was closed before its end)."""
        for _ in self:
            pass
        if self.result is None:
            raise GenerationCancelled("the stream was closed before its end: it has no result")
        return self.result
