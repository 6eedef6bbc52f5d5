"""The OpenAI chat-completion shapes (a response and a stream chunk), used by Model.chat and the server."""

from __future__ import annotations

import time
import uuid

from .results import GenerationResult


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def response(cid: str, created: int, model: str, result: GenerationResult) -> dict:
    """A `chat.completion` object."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": result.usage.as_dict()}


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None, **extra) -> dict:
    """A `chat.completion.chunk` object."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
