"""The OpenAI chat-completion shapes (a response and a stream chunk), used by Model.chat and the server."""

from __future__ import annotations

import time
import uuid

from ..text.tools import parse_call
from .logprobs import CompletionLogprobs
from .results import GenerationResult


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def response(cid: str, created: int, model: str, results: GenerationResult | list[GenerationResult],
             tool_names: tuple[str, ...] = ()) -> dict:
    """A `chat.completion` object (one choice per result: n > 1 gives several). A reply that is a call
    of one of `tool_names` becomes `tool_calls`, with finish_reason "tool_calls"."""
    results = results if isinstance(results, list) else [results]
    choices = [{"index": i, **message_of(r, tool_names), "logprobs": logprobs_of(r.logprobs)}
               for i, r in enumerate(results)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_of(results)}


def usage_of(results: list[GenerationResult]) -> dict:
    """OpenAI's usage of a request's choices: the prompt once (evaluated once for all), every choice's tokens."""
    prompt = results[0].usage.prompt_tokens
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def message_of(result: GenerationResult, tool_names: tuple[str, ...]) -> dict:
    calls = parse_call(result.text, tool_names) if tool_names and result.finish_reason == "stop" else None
    if calls:
        return {"message": {"role": "assistant", "content": None, "tool_calls": calls}, "finish_reason": "tool_calls"}
    return {"message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}


def chunks_of(whole: dict) -> list[dict]:
    """A whole response as stream chunks (a reply that may be a tool call is streamed once it has ended):
    per choice the role, then its content or tool calls, then its finish_reason; usage on the last."""
    out = []
    for c in whole["choices"]:
        args = (whole["id"], whole["created"], whole["model"])
        out.append(chunk(*args, {"role": "assistant", "content": ""}, None, index=c["index"]))
        calls = c["message"].get("tool_calls")
        delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]} if calls else \
            {"content": c["message"]["content"]}
        items = (c["logprobs"] or {}).get("content")
        out.append(chunk(*args, delta, None, index=c["index"], logprobs=items))
        out.append(chunk(*args, {}, c["finish_reason"], index=c["index"]))
    out[-1]["usage"] = whole["usage"]
    return out


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None, index: int = 0,
          logprobs: list[dict] | None = None, **extra) -> dict:
    """A `chat.completion.chunk` object (of choice `index`; `logprobs`: the items of its tokens)."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs_of(logprobs or None), "finish_reason": finish_reason}
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice], **extra}


def logprobs_of(items: list[dict] | None) -> dict | None:
    """A choice's `logprobs` object: {"content": items}, or None (not requested)."""
    return {"content": items} if items is not None else None


def take(held: list[dict]) -> list[dict]:
    """The held logprobs items, emptying the list."""
    items = held[:]
    held.clear()
    return items


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def text_response(cid: str, created: int, model: str, results: list[GenerationResult],
                  silent: frozenset[bytes] = frozenset()) -> dict:
    """A `text_completion` object (/v1/completions), one choice per result; logprobs in that endpoint's
    shape when the results carry them (`silent`: the text of tokens the reply leaves out)."""
    choices = [{"index": i, "text": r.text, "logprobs": completion_logprobs(r.logprobs, silent),
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage_of(results)}


def completion_logprobs(items: list[dict] | None, silent: frozenset[bytes] = frozenset()) -> dict | None:
    """A whole choice's logprobs items in /v1/completions' shape (None: not requested)."""
    return CompletionLogprobs(silent).take(items) if items is not None else None


def text_chunk(cid: str, created: int, model: str, text: str, finish_reason: str | None, index: int,
               logprobs: dict | None = None) -> dict:
    """A streamed `text_completion` object: one piece of choice `index` (`logprobs`: its tokens', in
    the endpoint's shape, from the choice's CompletionLogprobs)."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
