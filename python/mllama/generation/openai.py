"""The OpenAI chat-completion shapes (a response and a stream chunk), used by Model.chat and the server."""

from __future__ import annotations

import time
import uuid

from .results import GenerationResult


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def response(cid: str, created: int, model: str, results: GenerationResult | list[GenerationResult]) -> dict:
    """A `chat.completion` object (one choice per result: n > 1 gives several)."""
    results = results if isinstance(results, list) else [results]
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
               for i, r in enumerate(results)]
    prompt = results[0].usage.prompt_tokens
    completion = sum(r.usage.completion_tokens for r in results)
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None, index: int = 0,
          **extra) -> dict:
    """A `chat.completion.chunk` object (of choice `index`)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}], **extra}
