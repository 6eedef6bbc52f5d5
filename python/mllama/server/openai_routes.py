"""OpenAI's /v1/chat/completions (streamed as server-sent events or whole) and /v1/models."""

import json

from ..generation import openai
from ..generation.api import tool_spec
from .queue import BatchQueue, ClientGone, Reply, first_pieces, results, while_connected
from .requests import (RequestError, check_messages, error_body, flag, include_usage, logprob_options, read_json,
                       response_format, sampling)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def register(app, queue: BatchQueue, model_id: str, limits: dict, error) -> None:
    # FastAPI reads the routes' annotations at run time: this module must not use postponed
    # annotations (`from __future__ import annotations`), or `Request` would not resolve here
    from fastapi import Request
    from fastapi.responses import Response, StreamingResponse

    card = {"id": model_id, "object": "model", "created": int(queue.model.path.stat().st_mtime), "owned_by": "mllama"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            return error(RequestError(404, f"The model '{name}' does not exist", param="model",
                                      code="model_not_found"))
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        replies = None
        try:
            body = await read_json(request, limits["max_body_bytes"])
            messages = check_messages(body, limits["allow_local_images"])
            if body.get("logit_bias"):
                raise RequestError(400, "'logit_bias' is not supported", param="logit_bias")
            options = {**sampling(body), **response_format(body), **logprob_options(body)}
            spec = tool_spec(body.get("tools"), body.get("tool_choice"), options)
            tools, n = spec.tools if spec else None, choices(body, queue.model.n_seq_max)
            stream, usage_too = flag(body, "stream"), include_usage(body)  # (checked before anything is queued)
            go_on = flag(body, "continue_final_message")  # vLLM's: the last (assistant) message continued
            render = {"tools": tools, "continue_final": go_on, "within_context": True}
            replies = await queue.submit(lambda model: model.chat_prompt(messages, **render), options, n=n)
            firsts = await while_connected(request, first_pieces(replies), replies)
            cid, created = openai.completion_id(), openai.now()
            if not stream or tools:  # a reply that may be a tool call is streamed once whole
                ended = await while_connected(request, results(replies), replies)
                whole = openai.response(cid, created, model_id, ended, spec.names if spec else ())
                if not stream:
                    return whole
                return StreamingResponse(iter(whole_events(whole, usage_too)), media_type="text/event-stream")
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as exc:
            if replies:  # failed after it was queued: not generated for no one
                await replies[0].aclose()
            return error(exc)
        return StreamingResponse(events(replies, firsts, cid, created, model_id, usage_too),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def whole_events(whole: dict, include_usage: bool) -> list[str]:
    """A whole response as OpenAI's stream: with include_usage every chunk has "usage": null and a last chunk
    without choices carries the usage."""
    chunks = openai.chunks_of(whole)
    usage = chunks[-1].pop("usage")
    if include_usage:
        chunks = [{**c, "usage": None} for c in chunks] + [usage_chunk(chunks[-1], usage)]
    return [*map(sse, chunks), "data: [DONE]\n\n"]


def inband_error(exc: BaseException) -> dict:
    """OpenAI's error object for an error after the headers (the stream's last event), its message in full."""
    body = error_body(exc)[1]
    body["error"]["message"] = str(exc) or body["error"]["message"]
    return body


def usage_chunk(last: dict, usage: dict) -> dict:
    return {**last, "choices": [], "usage": usage}


def choices(body: dict, n_seq_max: int) -> int:
    """OpenAI's n, within the sequences the server runs at once (each choice takes one)."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(400, "'n' must be a positive integer", param="n")
    if n > n_seq_max:  # (had named the Python API's n_seq_max, no param)
        raise RequestError(400, f"'n' is {n}: this server runs at most {n_seq_max} sequences at once "
                                "(mllama serve --parallel)", param="n")
    return n


async def events(replies: list[Reply], firsts: list, cid: str, created: int, model_id: str, include_usage: bool):
    """The choices one after the other (each chunk names its choice's index); all are generated together. With
    include_usage, every chunk has "usage": null and a last one without choices carries the usage."""
    extra = {"usage": None} if include_usage else {}
    try:
        for i, (reply, first) in enumerate(zip(replies, firsts)):
            yield sse(openai.chunk(cid, created, model_id, {"role": "assistant", "content": ""}, None, index=i,
                                   **extra))
            if first:
                yield sse(openai.chunk(cid, created, model_id, {"content": first}, None, index=i,
                                       logprobs=openai.take(reply.held), **extra))
            async for piece in reply:
                yield sse(openai.chunk(cid, created, model_id, {"content": piece}, None, index=i,
                                       logprobs=openai.take(reply.held), **extra))
            yield sse(openai.chunk(cid, created, model_id, {}, reply.result.finish_reason, index=i,
                                   logprobs=openai.take(reply.held), **extra))
        if include_usage:  # every choice's usage
            usage = openai.usage_of([r.result for r in replies])
            yield sse(usage_chunk(openai.chunk(cid, created, model_id, {}, None), usage))
    except Exception as exc:  # after the headers: report in-band, as OpenAI does
        yield sse(inband_error(exc))
        return
    finally:
        await replies[0].aclose()  # a client that went away stops the generation now
    yield "data: [DONE]\n\n"
