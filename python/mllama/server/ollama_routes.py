"""Ollama's API for its existing clients: /api/chat and /api/generate (NDJSON streams, or one object
with "stream": false; durations in nanoseconds; `logprobs`/`top_logprobs` as Ollama 0.12.11+: every
line carries the items of its tokens), /api/tags, /api/show, /api/ps, /api/version; Ollama's routes for
what mllama does not do (embeddings, pulling and making models) answer 501 saying so."""

import hashlib
import json
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

from .._version import __version__
from ..generation.api import tool_spec
from ..generation.openai import take
from ..generation.results import GenerationResult
from ..ollama_store import manifest_listing
from ..text.tools import may_be_call, parse_call
from .ollama_requests import (chat_prompt, generate_prompt, loads_only, options, output_format, refuse_unsupported,
                              truncates, unloads)
from .queue import BatchQueue, ClientGone, Reply, first_pieces, results, while_connected
from .requests import (RequestError, check_messages, flag, from_ollama, logprob_options, ollama_error_body,
                       read_json)

OLLAMA_API_VERSION = "0.12.11"  # the Ollama release whose API these routes follow (logprobs came with it)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def final_fields(result: GenerationResult, started: float) -> dict:
    """Ollama's closing fields: why it stopped, token counts, durations in nanoseconds."""
    t = result.timings
    return {"done_reason": result.finish_reason, "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0, "prompt_eval_count": result.usage.prompt_tokens,
            "prompt_eval_duration": int(t.prompt_s * 1e9), "eval_count": result.usage.completion_tokens,
            "eval_duration": int(t.generate_s * 1e9)}


def human_count(n: int) -> str:
    """A parameter count as Ollama writes it: 10.7B, 16.74M, 850K."""
    for scale, suffix, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return str(n)


def model_card(model) -> dict:
    """What /api/tags, /api/show and /api/ps say about the loaded model."""
    info = model.info
    st = model.path.stat()
    text_types = Counter(t.type for t in model.tensors() if t.name.startswith("blk.") and len(t.shape) == 2)
    # identifies the loaded file (path, size, modification time); hashing its content would read gigabytes. A model
    # from the Ollama store is listed as Ollama lists it: its manifest's digest, size (every layer) and time.
    identity = f"{model.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()  # (any file name)
    size, mtime = info["file_size"], st.st_mtime
    listing = manifest_listing(model.ollama_manifest) if model.ollama_manifest else None
    if listing is not None:
        digest, size, mtime = listing["digest"], listing["size"], listing["mtime"]
    details = {"parent_model": "", "format": "gguf", "family": "mllama", "families": ["mllama"],
               "parameter_size": human_count(info["n_params"]),
               "quantization_level": text_types.most_common(1)[0][0].upper() if text_types else ""}
    hp = model.hparams
    model_info = {"general.architecture": "mllama", "general.parameter_count": info["n_params"],
                  "mllama.context_length": hp.n_ctx_train, "mllama.embedding_length": hp.n_embd,
                  "mllama.block_count": hp.n_layer, "mllama.vision.block_count": hp.v_n_layer}
    modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": model.name, "model": model.name, "modified_at": modified, "size": size,
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
    """Ollama's tool_calls (an id, the call's index, arguments as an object) for a reply that calls one of `names`."""
    calls = parse_call(text, names) if names else None
    return [{"id": c["id"], "function": {"index": i, "name": c["function"]["name"],
                                         "arguments": json.loads(c["function"]["arguments"])}}
            for i, c in enumerate(calls)] if calls else None


def register(app, queue: BatchQueue, model_id: str, limits: dict, error) -> None:
    """`error`: an exception as a JSON response in Ollama's shape, {"error": "<message>"}."""
    # FastAPI reads the routes' annotations at run time: this module must not use postponed
    # annotations (`from __future__ import annotations`), or `Request` would not resolve here
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    card = model_card(queue.model)
    tag = {k: card[k] for k in ("name", "model", "modified_at", "size", "digest", "details")}

    async def answer(request: Request, key: str):
        started, replies = time.perf_counter(), None
        try:
            body = await read_json(request, limits["max_body_bytes"])
            refuse_unsupported(body, model_id)
            stream, unload = flag(body, "stream", True), unloads(body)
            opts = {**options(body), **output_format(body), **logprob_options(body)}
            spec = tool_spec(body.get("tools"), None, opts) if key == "message" else None
            tools, names = (spec.tools, spec.names) if spec else (None, ())
            if loads_only(body, key):  # Ollama's way to load (or, keep_alive 0, unload) a model
                reason = "unload" if unload else "load"
                return JSONResponse(json.loads(line(model_id, now_iso(), key, "", {"done_reason": reason})))
            if key == "message":
                messages = [from_ollama(m) for m in check_messages(body, limits["allow_local_images"], True)]
                prompt = chat_prompt(messages, tools, truncates(body), opts.get("max_tokens"))
            else:
                prompt = generate_prompt(body)
            replies = await queue.submit(prompt, opts)
            first, = await while_connected(request, first_pieces(replies), replies)
            reply, logprobs = replies[0], "logprobs" in opts
            if not stream:
                result, = await while_connected(request, results(replies), replies)
                calls = tool_calls(result.text, names)
                return JSONResponse(json.loads(line(model_id, now_iso(), key, "" if calls else result.text,
                                                    final_fields(result, started), calls, result.logprobs)))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as exc:
            if replies:  # failed after it was queued: not generated for no one
                await replies[0].aclose()
            return error(exc)
        return StreamingResponse(ndjson(reply, first, (model_id, key), started, logprobs, names),
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

    @app.api_route("/api/version", methods=["GET", "HEAD"])
    async def version():  # the Ollama API version these routes follow (clients enable features by it)
        return {"version": OLLAMA_API_VERSION, "mllama": __version__}

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags():
        return {"models": [tag]}

    @app.post("/api/show")
    async def show(request: Request):
        try:
            body = await read_json(request, limits["max_body_bytes"])
            if not (body.get("model") or body.get("name")):
                raise RequestError(400, "model is required")
        except Exception as exc:
            return error(exc)
        return {"modelfile": "", "parameters": "", "template": card["template"], "details": card["details"],
                "model_info": card["model_info"], "capabilities": ["completion", "vision", "tools"],
                "modified_at": card["modified_at"]}

    @app.post("/api/pull")
    async def pull(request: Request):  # scripts pull before they chat: the model served is there already
        try:
            body = await read_json(request, limits["max_body_bytes"])
            name = str(body.get("model") or body.get("name") or "")
            if not name:
                raise RequestError(400, "model is required")
            stream = flag(body, "stream", True)
            if name.removesuffix(":latest") != model_id.removesuffix(":latest"):
                raise RequestError(501, f"mllama serves one model ({model_id}) and does not pull others ('{name}')")
        except Exception as exc:
            return error(exc)
        if not stream:
            return {"status": "success"}
        return StreamingResponse(iter([json.dumps({"status": "success"}) + "\n"]), media_type="application/x-ndjson")

    def not_done(what: str):
        async def refuse(request: Request):
            return error(RequestError(501, f"{request.method} {request.url.path}: mllama {what}"))
        return refuse

    for path in ("/api/embed", "/api/embeddings"):
        app.post(path)(not_done("does not compute embeddings (a generative model only): use an embedding "
                                "model's server"))
    for path, method in (("/api/create", "post"), ("/api/copy", "post"), ("/api/push", "post"),
                         ("/api/delete", "delete"), ("/api/blobs/{digest}", "post"), ("/api/blobs/{digest}", "head")):
        getattr(app, method)(path)(not_done(f"serves one model file ({model_id}) and does not make, copy, push or "
                                            "delete models"))

    @app.get("/api/ps")
    async def ps():
        expires = (datetime.now(timezone.utc) + timedelta(days=3650)).isoformat().replace("+00:00", "Z")
        vram = card["bytes_weights"] if card["on_gpu"] else 0
        return {"models": [{**tag, "expires_at": expires, "size": card["bytes_weights"], "size_vram": vram,
                            "context_length": card["n_ctx"]}]}


async def pieces(first: str | None, reply: Reply):
    if first:
        yield first
    async for piece in reply:
        yield piece


async def ndjson(reply: Reply, first: str | None, head: tuple, started: float, logprobs: bool, names: tuple = ()):
    """The streamed lines (`head`: model and "message" or "response"; each line stamped when sent), each with
    the logprobs items of its tokens when requested; the closing fields on the last. With tools (`names`), the
    text is held back while the reply may still be a tool call, and a call is sent as tool_calls."""
    def held() -> list:
        return take(reply.held) if logprobs else []

    model_id, key = head
    holding, pending, pending_items = bool(names), "", []  # the text held back, and its logprobs items
    try:
        async for piece in pieces(first, reply):
            items = held()
            if holding:
                pending, pending_items = pending + piece, pending_items + items
                if may_be_call(pending):
                    continue
                holding, piece, items = False, pending, pending_items
            yield line(model_id, now_iso(), key, piece, None, logprobs=items if logprobs else None)
        if holding and pending:
            calls = tool_calls(pending, names)
            yield line(model_id, now_iso(), key, "" if calls else pending, None, calls,
                       pending_items if logprobs else None)
        closing = final_fields(reply.result, started)
        yield line(model_id, now_iso(), key, "", closing, logprobs=held() if logprobs else None)
    except Exception as exc:  # after the headers: a last line with the error, as Ollama sends it
        yield json.dumps({"error": str(exc) or ollama_error_body(exc)[1]["error"]}) + "\n"
    finally:
        await reply.aclose()
