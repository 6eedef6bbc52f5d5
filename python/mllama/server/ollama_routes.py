"""Ollama's /api/chat (newline-delimited JSON stream, or one object with "stream": false)."""

import json
import time

from ..generation.results import GenerationResult
from .queue import GenerationQueue, Reply
from .requests import check_messages, from_ollama, read_json, sampling


def options(body: dict) -> dict:
    """Sampling from Ollama's `options` (num_predict > 0 is max_tokens)."""
    opts = body.get("options") or {}
    extra = {"max_tokens": opts["num_predict"]} if opts.get("num_predict", -1) > 0 else {}
    return sampling({**opts, **extra})


def line(model_id: str, created: str, content: str, result: GenerationResult | None) -> str:
    item: dict = {"model": model_id, "created_at": created, "message": {"role": "assistant", "content": content},
                  "done": result is not None}
    if result is not None:
        item.update(done_reason=result.finish_reason, prompt_eval_count=result.usage.prompt_tokens,
                    eval_count=result.usage.completion_tokens)
    return json.dumps(item) + "\n"


def register(app, queue: GenerationQueue, model_id: str, limits: dict, error) -> None:
    # FastAPI reads the routes' annotations at run time: this module must not use postponed
    # annotations (`from __future__ import annotations`), or `Request` would not resolve here
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        try:
            body = await read_json(request, limits["max_body_bytes"])
            messages = [from_ollama(m) for m in check_messages(body, limits["allow_local_images"])]
            reply = await queue.submit(messages, options(body))
            first = await reply.first()
        except Exception as exc:
            return error(exc)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if body.get("stream", True) is False:
            await reply.rest()
            return JSONResponse(json.loads(line(model_id, created, reply.result.text, reply.result)))
        return StreamingResponse(ndjson(reply, first, model_id, created), media_type="application/x-ndjson")


async def ndjson(reply: Reply, first: str | None, model_id: str, created: str):
    try:
        if first:
            yield line(model_id, created, first, None)
        async for piece in reply:
            yield line(model_id, created, piece, None)
        yield line(model_id, created, "", reply.result)
    finally:
        await reply.aclose()
