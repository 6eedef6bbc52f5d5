"""`mllama serve`: an OpenAI-compatible HTTP server (plus Ollama's /api/chat), one model, one
generation at a time, a bounded wait queue, request size limits, and cancellation when a streaming
client goes away. Needs the `server` extra (FastAPI + uvicorn)."""


import asyncio
import base64
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator


SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "repeat_penalty"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _sampling(body: dict) -> dict:
    out = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    if "max_completion_tokens" in out:
        out["max_tokens"] = out.pop("max_completion_tokens")
    for key, kind in (("temperature", float), ("top_p", float), ("min_p", float), ("presence_penalty", float),
                      ("frequency_penalty", float), ("repeat_penalty", float), ("max_tokens", int), ("top_k", int), ("seed", int)):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], (int, float))):
            raise RequestError(400, f"'{key}' must be a number")
        if key in out:
            out[key] = kind(out[key])
    if "max_tokens" in out and out["max_tokens"] < 1:
        raise RequestError(400, "'max_tokens' must be at least 1")
    return out


def _check_messages(body: dict, allow_local_images: bool) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict):
            raise RequestError(400, "each message must be an object")
        content = m.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url", {}).get("url", "") if isinstance(part.get("image_url"), dict) else str(part.get("image_url", ""))
                if not url.startswith("data:") and not allow_local_images:
                    raise RequestError(400, "image_url must be a data: URL (local paths need --allow-local-images)")
    return messages


class Generator:
    """Runs one generation at a time in a worker thread; requests wait in a bounded queue."""

    def __init__(self, model, max_queue: int):
        self.model = model
        self.max_queue = max_queue
        self.waiting = 0
        self._lock: asyncio.Lock | None = None

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._lock.locked() and self.waiting >= self.max_queue:
            raise RequestError(503, "the server is busy: the wait queue is full", {"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    def prepare(self, messages: list[dict]):
        tokens, images = self.model.chat_prompt(messages)
        return tokens, self.model._prepare_images(images)

    async def run(self, messages: list[dict], sampling: dict) -> AsyncIterator[str]:
        """Text pieces of the reply; the model is released when the worker stops (also on cancel)."""
        await self.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def work() -> None:
            try:
                tokens, images = self.prepare(messages)
                pieces = self.model._stream_text(tokens, images, **sampling)
                for piece in pieces:
                    if cancel.is_set():
                        pieces.close()
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as exc:  # delivered to the request
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)
                loop.call_soon_threadsafe(self._lock.release)

        threading.Thread(target=work, name="mllama-generate", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()


def _error_status(exc: BaseException) -> int:
    from .chat_template import TemplateError
    from .engine import ContextOverflowError
    from .preprocess import ImageError

    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, (ImageError, TemplateError, ContextOverflowError, ValueError, TypeError, KeyError)):
        return 400
    return 500


def create_app(model, *, max_queue: int = 8, max_body_bytes: int = 32 * 1024 * 1024, allow_local_images: bool = False):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="mllama", version=getattr(model, "__version__", "0"))
    gen = Generator(model, max_queue)
    model_id = model.name

    def error(exc: BaseException) -> JSONResponse:
        status = _error_status(exc)
        message = exc.message if isinstance(exc, RequestError) else str(exc) if status != 500 else "internal error"
        headers = exc.headers if isinstance(exc, RequestError) else {}
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}},
                            status_code=status, headers=headers)

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise RequestError(413, f"request body over {max_body_bytes} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise RequestError(413, f"request body over {max_body_bytes} bytes")
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"malformed JSON: {exc}") from None
        if not isinstance(value, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return value

    async def first_then_rest(pieces: AsyncIterator[str]) -> tuple[str | None, AsyncIterator[str]]:
        """Pull the first piece before answering, so early errors become HTTP errors."""
        try:
            first = await pieces.__anext__()
        except StopAsyncIteration:
            first = None
        return first, pieces

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": gen.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "mllama"}]}

    def completion_chunk(cid: str, created: int, delta: dict, finish: str | None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await read_json(request)
            messages = _check_messages(body, allow_local_images)
            sampling = _sampling(body)
            if body.get("n", 1) != 1:
                raise RequestError(400, "only n=1 is supported")
            first, pieces = await first_then_rest(gen.run(messages, sampling))
        except Exception as exc:
            return error(exc)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.get("stream"):
            text = (first or "") + "".join([p async for p in pieces])
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": model.last_finish_reason}], "usage": _usage(model)}

        async def events():
            yield completion_chunk(cid, created, {"role": "assistant", "content": ""}, None)
            if first:
                yield completion_chunk(cid, created, {"content": first}, None)
            try:
                async for piece in pieces:
                    yield completion_chunk(cid, created, {"content": piece}, None)
            except Exception as exc:  # after the headers: report in-band, as OpenAI does
                yield f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n"
                return
            finally:
                await pieces.aclose()  # a client that went away stops the generation now
            extra = {"usage": _usage(model)} if (body.get("stream_options") or {}).get("include_usage") else {}
            yield completion_chunk(cid, created, {}, model.last_finish_reason, **extra)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        try:
            body = await read_json(request)
            messages = [_from_ollama(m) for m in _check_messages(body, allow_local_images)]
            sampling = _sampling({**(body.get("options") or {}), **({"max_tokens": body["options"]["num_predict"]}
                                  if (body.get("options") or {}).get("num_predict", -1) > 0 else {})})
            first, pieces = await first_then_rest(gen.run(messages, sampling))
        except Exception as exc:
            return error(exc)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def line(content: str, done: bool) -> str:
            item: dict = {"model": model_id, "created_at": created, "message": {"role": "assistant", "content": content}, "done": done}
            if done:
                item.update(done_reason=model.last_finish_reason, prompt_eval_count=model.last_usage["prompt_tokens"],
                            eval_count=model.last_usage["completion_tokens"])
            return json.dumps(item) + "\n"

        if body.get("stream", True) is False:
            text = (first or "") + "".join([p async for p in pieces])
            return JSONResponse(json.loads(line(text, True)))

        async def ndjson():
            try:
                if first:
                    yield line(first, False)
                async for piece in pieces:
                    yield line(piece, False)
                yield line("", True)
            finally:
                await pieces.aclose()

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    return app


def _from_ollama(message: dict) -> dict:
    images = message.get("images") or []
    if not images:
        return message
    decoded = []
    for image in images:
        try:
            decoded.append(base64.b64decode(image, validate=True))
        except (ValueError, TypeError):
            raise RequestError(400, "images must be base64 strings") from None
    return {**message, "images": decoded}


def _usage(model) -> dict:
    u = model.last_usage
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def serve(model, host: str = "127.0.0.1", port: int = 8080, **kwargs: Any) -> None:
    import uvicorn

    uvicorn.run(create_app(model, **kwargs), host=host, port=port, log_level="warning")


