"""OpenAI's /v1/chat/completions (streamed as server-sent events or whole) and /v1/models."""

import json

from ..generation import openai
from .queue import GenerationQueue, Reply
from .requests import RequestError, check_messages, read_json, response_format, sampling


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def register(app, queue: GenerationQueue, model_id: str, limits: dict, error) -> None:
    # FastAPI reads the routes' annotations at run time: this module must not use postponed
    # annotations (`from __future__ import annotations`), or `Request` would not resolve here
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "mllama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await read_json(request, limits["max_body_bytes"])
            messages = check_messages(body, limits["allow_local_images"])
            options = {**sampling(body), **response_format(body)}
            if body.get("n", 1) != 1:
                raise RequestError(400, "only n=1 is supported")
            reply = await queue.submit(lambda model: model.chat_prompt(messages), options)
            first = await reply.first()
        except Exception as exc:
            return error(exc)
        cid, created = openai.completion_id(), openai.now()
        if not body.get("stream"):
            await reply.rest()  # the result holds the whole text, `first` included
            return openai.response(cid, created, model_id, reply.result)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(events(reply, first, cid, created, model_id, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def events(reply: Reply, first: str | None, cid: str, created: int, model_id: str, include_usage: bool):
    yield sse(openai.chunk(cid, created, model_id, {"role": "assistant", "content": ""}, None))
    if first:
        yield sse(openai.chunk(cid, created, model_id, {"content": first}, None))
    try:
        async for piece in reply:
            yield sse(openai.chunk(cid, created, model_id, {"content": piece}, None))
    except Exception as exc:  # after the headers: report in-band, as OpenAI does
        yield sse({"error": {"message": str(exc)}})
        return
    finally:
        await reply.aclose()  # a client that went away stops the generation now
    result = reply.result
    extra = {"usage": result.usage.as_dict()} if include_usage else {}
    yield sse(openai.chunk(cid, created, model_id, {}, result.finish_reason, **extra))
    yield "data: [DONE]\n\n"
