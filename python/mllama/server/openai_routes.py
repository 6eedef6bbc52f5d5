"""OpenAI's /v1/chat/completions (streamed as server-sent events or whole) and /v1/models."""

import json

from ..generation import openai
from ..generation.api import tool_spec
from .queue import BatchQueue, Reply
from .requests import RequestError, check_messages, logprob_options, read_json, response_format, sampling


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def register(app, queue: BatchQueue, model_id: str, limits: dict, error) -> None:
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
            options = {**sampling(body), **response_format(body), **logprob_options(body)}
            spec = tool_spec(body.get("tools"), body.get("tool_choice"), options)
            tools, n = spec.tools if spec else None, choices(body)
            replies = await queue.submit(lambda model: model.chat_prompt(messages, tools=tools), options, n=n)
            firsts = [await reply.first() for reply in replies]
        except Exception as exc:
            return error(exc)
        cid, created = openai.completion_id(), openai.now()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not body.get("stream") or tools:  # a reply that may be a tool call is streamed once whole
            whole = openai.response(cid, created, model_id, await results(replies), spec.names if spec else ())
            if not body.get("stream"):
                return whole
            return StreamingResponse(iter(whole_events(whole, include_usage)), media_type="text/event-stream")
        return StreamingResponse(events(replies, firsts, cid, created, model_id, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def results(replies: list[Reply]) -> list:
    """Every choice's GenerationResult once all have ended (a client that goes away stops them)."""
    try:
        for reply in replies:
            await reply.rest()  # the result holds the whole text, `first` included
    finally:
        await replies[0].aclose()
    return [reply.result for reply in replies]


def whole_events(whole: dict, include_usage: bool) -> list[str]:
    chunks = openai.chunks_of(whole)
    if not include_usage:
        del chunks[-1]["usage"]
    return [*map(sse, chunks), "data: [DONE]\n\n"]


def choices(body: dict) -> int:
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(400, "'n' must be a positive integer")
    return n


async def events(replies: list[Reply], firsts: list, cid: str, created: int, model_id: str, include_usage: bool):
    """The choices one after the other (each chunk names its choice's index); all are generated together."""
    try:
        for i, (reply, first) in enumerate(zip(replies, firsts)):
            yield sse(openai.chunk(cid, created, model_id, {"role": "assistant", "content": ""}, None, index=i))
            if first:
                yield sse(openai.chunk(cid, created, model_id, {"content": first}, None, index=i,
                                       logprobs=openai.take(reply.held)))
            async for piece in reply:
                yield sse(openai.chunk(cid, created, model_id, {"content": piece}, None, index=i,
                                       logprobs=openai.take(reply.held)))
            usage = {}
            if include_usage and i == len(replies) - 1:  # usage of every choice, on the last chunk
                usage = {"usage": openai.response(cid, created, model_id, [r.result for r in replies])["usage"]}
            yield sse(openai.chunk(cid, created, model_id, {}, reply.result.finish_reason, index=i,
                                   logprobs=openai.take(reply.held), **usage))
    except Exception as exc:  # after the headers: report in-band, as OpenAI does
        yield sse({"error": {"message": str(exc)}})
        return
    finally:
        await replies[0].aclose()  # a client that went away stops the generation now
    yield "data: [DONE]\n\n"
