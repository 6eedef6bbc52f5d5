"""Ollama's API for its existing clients: /api/chat and /api/generate (NDJSON streams, or one object
with "stream": false; durations in nanoseconds; `logprobs`/`top_logprobs` as Ollama 0.12.11+: every
line carries the items of its tokens), /api/tags, /api/show, /api/ps, /api/version."""

import hashlib
import json
import logging
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

from .._version import __version__
from ..generation.api import tool_spec
from ..generation.context_fit import fit_chat
from ..text.tools import parse_call
from ..generation.openai import take
from ..generation.results import GenerationResult
from .queue import BatchQueue, ClientGone, Reply, first_pieces, results, while_connected
from .requests import (RequestError, check_messages, from_ollama, logprob_options, ollama_error_body, read_json,
                       sampling)


log = logging.getLogger("mllama.server")

OLLAMA_API_VERSION = "0.12.11"  # the Ollama release whose API these routes follow (logprobs came with it)


def loads_only(body: dict, key: str) -> bool:
    """A request that only loads (or unloads) the model, as Ollama's clients send it: /api/chat with no
    messages, /api/generate with no prompt and no images."""
    if key == "message":
        return body.get("messages") in (None, [])
    return not body.get("prompt") and not body.get("images")


def options(body: dict) -> dict:
    """Sampling from Ollama's `options` (num_predict > 0 is max_tokens)."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise RequestError(400, "'options' must be an object")
    n_predict = opts.get("num_predict")
    extra = {"max_tokens": n_predict} if isinstance(n_predict, int) and n_predict > 0 else {}
    return sampling({**opts, **extra})


def output_format(body: dict) -> dict:
    """Ollama's `format` ("json" or a JSON schema object) as the model's response_format keyword;
    the model compiles and checks the schema (ValueError: 400)."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise RequestError(400, "'format' must be \"json\" or a JSON schema object")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def final_fields(result: GenerationResult, started: float) -> dict:
    """Ollama's closing fields: why it stopped, token counts, durations in nanoseconds."""
    t = result.timings
    return {"done_reason": result.finish_reason, "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0, "prompt_eval_count": result.usage.prompt_tokens,
            "prompt_eval_duration": int(t.prompt_s * 1e9), "eval_count": result.usage.completion_tokens,
            "eval_duration": int(t.generate_s * 1e9)}


def model_card(model) -> dict:
    """What /api/tags, /api/show and /api/ps say about the loaded model."""
    info = model.info
    st = model.path.stat()
    text_types = Counter(t.type for t in model.tensors() if t.name.startswith("blk.") and len(t.shape) == 2)
    # identifies the loaded file (path, size, modification time); hashing its content would read gigabytes
    digest = hashlib.sha256(f"{model.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    details = {"parent_model": "", "format": "gguf", "family": "mllama", "families": ["mllama"],
               "parameter_size": f"{info['n_params'] / 1e9:.1f}B",
               "quantization_level": text_types.most_common(1)[0][0].upper() if text_types else ""}
    hp = model.hparams
    model_info = {"general.architecture": "mllama", "general.parameter_count": info["n_params"],
                  "mllama.context_length": hp.n_ctx_train, "mllama.embedding_length": hp.n_embd,
                  "mllama.block_count": hp.n_layer, "mllama.vision.block_count": hp.v_n_layer}
    modified = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": model.name, "model": model.name, "modified_at": modified, "size": info["file_size"],
            "digest": digest, "details": details, "model_info": model_info, "template": model.chat_template,
            "bytes_weights": info["n_bytes_weights"], "on_gpu": info["device"].lower() != "cpu", "n_ctx": model.n_ctx}


def line(model_id: str, created: str, key: str, content: str, closing: dict | None, calls: list | None = None,
         logprobs: list | None = None) -> str:
    """One response object (an NDJSON line); `logprobs`: the items of its tokens, when requested (Ollama's
    {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}, the chat route's own items)."""
    item: dict = {"model": model_id, "created_at": created, "done": closing is not None}
    message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
    item.update({"message": message} if key == "message" else {"response": content})
    if logprobs is not None:
        item["logprobs"] = logprobs
    return json.dumps({**item, **(closing or {})}) + "\n"


def tool_calls(text: str, names: tuple) -> list | None:
    """Ollama's tool_calls (arguments as an object) for a reply that calls one of `names`."""
    calls = parse_call(text, names) if names else None
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls] if calls else None


def truncates(body: dict) -> bool:
    """Ollama's `truncate` (default true): a chat history too long for the context leaves out its oldest
    messages. (`shift`, Ollama's context shift while it generates, is read but not done: a reply that fills
    the context ends with done_reason "length".)"""
    for key in ("truncate", "shift"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise RequestError(400, f"'{key}' must be true or false")
    return body.get("truncate") is not False


def chat_prompt(messages: list[dict], tools, truncate: bool, max_tokens):
    """The prompt of /api/chat for the queue: the messages fitted to the context unless truncate is false
    (messages left out are logged, as Ollama does)."""
    def prompt(model):
        if not truncate:
            return model.chat_prompt(messages, tools=tools)
        fitted = fit_chat(model, messages, tools=tools, max_tokens=max_tokens)
        if fitted.n_left_out and len(fitted.tokens) <= model.n_ctx:  # (a prompt still over it fails: no cut)
            log.warning("left out the %d oldest of %d messages to fit the context (%d tokens)",
                        fitted.n_left_out, len(messages), model.n_ctx)
        return fitted.tokens, fitted.images
    return prompt


def generate_prompt(body: dict):
    """The prompt of /api/generate: the chat template around prompt, system and images, or with
    "raw": true the prompt as it is (special tokens allowed)."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt' must be a string")
    images = from_ollama({"images": body.get("images") or []}).get("images", [])
    if body.get("raw"):
        return lambda model: (model.tokenize(prompt, special=True), images)
    messages = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    messages.append({"role": "user", "content": prompt, "images": images})
    return lambda model: model.chat_prompt(messages)


def register(app, queue: BatchQueue, model_id: str, limits: dict, error) -> None:
    """`error`: an exception as a JSON response in Ollama's shape, {"error": "<message>"}."""
    # FastAPI reads the routes' annotations at run time: this module must not use postponed
    # annotations (`from __future__ import annotations`), or `Request` would not resolve here
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    card = model_card(queue.model)
    tag = {k: card[k] for k in ("name", "model", "modified_at", "size", "digest", "details")}

    async def answer(request: Request, key: str):
        started = time.perf_counter()
        try:
            body = await read_json(request, limits["max_body_bytes"])
            opts = {**options(body), **output_format(body), **logprob_options(body)}
            spec = tool_spec(body.get("tools"), None, opts) if key == "message" else None
            tools, names = (spec.tools, spec.names) if spec else (None, ())
            if loads_only(body, key):  # Ollama's way to load (or, keep_alive 0, unload) a model
                reason = "unload" if body.get("keep_alive") in (0, "0", "0s", "0m") else "load"
                return JSONResponse(json.loads(line(model_id, now_iso(), key, "", {"done_reason": reason})))
            if key == "message":
                messages = [from_ollama(m) for m in check_messages(body, limits["allow_local_images"])]
                prompt = chat_prompt(messages, tools, truncates(body), opts.get("max_tokens"))
            else:
                prompt = generate_prompt(body)
            replies = await queue.submit(prompt, opts)
            first, = await while_connected(request, first_pieces(replies), replies)
            reply, created, logprobs = replies[0], now_iso(), "logprobs" in opts
            if body.get("stream", True) is False or tools:  # a reply that may be a tool call is sent once whole
                result, = await while_connected(request, results(replies), replies)
                closing, text, items = final_fields(result, started), result.text, result.logprobs
                calls = tool_calls(text, names)
                text = "" if calls else text
                if body.get("stream", True) is False:
                    return JSONResponse(json.loads(line(model_id, created, key, text, closing, calls, items)))
                lines = [line(model_id, created, key, text, None, calls, items),
                         line(model_id, created, key, "", closing, logprobs=[] if logprobs else None)]
                return StreamingResponse(iter(lines), media_type="application/x-ndjson")
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as exc:
            return error(exc)
        return StreamingResponse(ndjson(reply, first, (model_id, created, key), started, logprobs),
                                 media_type="application/x-ndjson")

    @app.get("/")
    async def root():  # Ollama's clients (its CLI: HEAD /) check that the server runs
        return PlainTextResponse("Ollama is running")

    @app.head("/")
    async def root_head():
        return PlainTextResponse("Ollama is running")

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        return await answer(request, "message")

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        return await answer(request, "response")

    @app.get("/api/version")
    async def version():  # the Ollama API version these routes follow (clients enable features by it)
        return {"version": OLLAMA_API_VERSION, "mllama": __version__}

    @app.get("/api/tags")
    async def tags():
        return {"models": [tag]}

    @app.post("/api/show")
    async def show():
        return {"modelfile": "", "parameters": "", "template": card["template"], "details": card["details"],
                "model_info": card["model_info"], "capabilities": ["completion", "vision", "tools"],
                "modified_at": card["modified_at"]}

    @app.get("/api/ps")
    async def ps():
        expires = (datetime.now(timezone.utc) + timedelta(days=3650)).isoformat().replace("+00:00", "Z")
        vram = card["bytes_weights"] if card["on_gpu"] else 0
        return {"models": [{**tag, "expires_at": expires, "size": card["bytes_weights"], "size_vram": vram,
                            "context_length": card["n_ctx"]}]}


async def ndjson(reply: Reply, first: str | None, head: tuple, started: float, logprobs: bool):
    """The streamed lines (`head`: model, created_at, "message" or "response"), each with the logprobs
    items of its tokens when requested; the closing fields on the last."""
    def held() -> list | None:
        return take(reply.held) if logprobs else None

    try:
        if first:
            yield line(*head, first, None, logprobs=held())
        async for piece in reply:
            yield line(*head, piece, None, logprobs=held())
        yield line(*head, "", final_fields(reply.result, started), logprobs=held())
    except Exception as exc:  # after the headers: a last line with the error, as Ollama sends it
        yield json.dumps({"error": str(exc) or ollama_error_body(exc)[1]["error"]}) + "\n"
    finally:
        await reply.aclose()
