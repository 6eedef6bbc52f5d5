"""The HTTP application: one model whose batch scheduler runs up to n_seq_max requests together
(BatchQueue), OpenAI's and Ollama's routes, /health and /metrics. FastAPI, uvicorn and
prometheus-client (the `server` extra) are imported only here, when an app is made."""

from __future__ import annotations

from typing import Any

from . import completions_routes, ollama_routes, openai_routes
from .metrics import Metrics
from .queue import BatchQueue
from .requests import RequestError, error_body, ollama_error_body


# Origins whose pages may call the server without --allow-origin: this machine's, and desktop apps' (Ollama's default)
LOCAL_ORIGINS = (r"(https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?"
                 r"|(app|file|tauri|vscode-webview|vscode-file)://.*)")


def create_app(model, *, max_queue: int = 8, max_body_bytes: int = 32 * 1024 * 1024, allow_local_images: bool = False,
               allow_origins: list[str] = ()):
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mllama", version=getattr(model, "__version__", "0"))
    app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["*"], allow_headers=["*"])
    queue = BatchQueue(model, max_queue, Metrics(model))
    app.state.stop_requests = queue.stop  # (serve's shutdown: answers end now, in their own shape)
    model_id = model.name
    limits = {"max_body_bytes": max_body_bytes, "allow_local_images": allow_local_images}

    def response(shape):  # an exception as a JSON error response in one API's shape (error_body, ollama_error_body)
        def error(exc: BaseException) -> JSONResponse:
            status, body, headers = shape(exc)
            return JSONResponse(body, status_code=status, headers=headers)
        return error

    error, ollama_error = response(error_body), response(ollama_error_body)

    @app.exception_handler(HTTPException)
    async def unknown_route(request, exc: HTTPException):  # a wrong path or method, in the API's own error shape
        wrong = RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                             dict(exc.headers or {}))
        return (ollama_error if request.url.path.startswith("/api/") else error)(wrong)

    @app.get("/health")
    async def health():
        scheduler = model.scheduler
        if model.info["lost_worker"]:  # its weights on that worker are gone: 503 until restarted
            return JSONResponse({"status": "error", "model": model_id,
                                 "error": "an RPC worker holding part of the model failed: restart the server"},
                                status_code=503)
        return {"status": "ok", "model": model_id, "running": len(scheduler.running), "waiting": scheduler.n_waiting,
                "preparing": queue.preparing, "sequences": model.n_seq_max}  # (as /metrics counts them)

    @app.get("/metrics")
    async def metrics():
        body, content_type = queue.metrics.render()
        return Response(body, media_type=content_type)

    openai_routes.register(app, queue, model_id, limits, error)
    completions_routes.register(app, queue, model_id, limits, error)
    ollama_routes.register(app, queue, model_id, limits, ollama_error)
    return app


SHUTDOWN_GRACE_S = 3  # on Ctrl-C or SIGTERM every request is stopped; their answers get this long to end


class Stopped(Exception):
    """The server was stopped by SIGTERM (after its graceful shutdown): the caller exits cleanly."""


def serve(model, host: str = "127.0.0.1", port: int = 8080, sock=None, **kwargs: Any) -> None:
    """Serve until Ctrl-C (KeyboardInterrupt afterwards) or SIGTERM (Stopped afterwards, so that the caller's
    cleanup runs: uvicorn raises the signal again once it has shut down, whose default action would kill).
    `sock`: a socket bound already (host and port then only name it)."""
    import signal
    import threading

    import uvicorn

    def stopped(signum, frame):
        raise Stopped()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # the requests stop at the next step: their answers end cleanly
            app.state.stop_requests()
            super().handle_exit(sig, frame)

    app = create_app(model, **kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    main = threading.current_thread() is threading.main_thread()  # (signal handlers: the main thread's only)
    before = signal.signal(signal.SIGTERM, stopped) if main else None  # (uvicorn's replaces it while it runs)
    try:
        Server(config).run(sockets=[sock] if sock is not None else None)
    finally:
        if main:
            signal.signal(signal.SIGTERM, before)
