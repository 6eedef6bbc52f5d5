"""The HTTP application: one model, one generation at a time (GenerationQueue), OpenAI's and
Ollama's chat routes, /health. FastAPI and uvicorn (the `server` extra) are imported only here,
when an app is made."""

from __future__ import annotations

from typing import Any

from . import ollama_routes, openai_routes
from .queue import GenerationQueue
from .requests import error_body


def create_app(model, *, max_queue: int = 8, max_body_bytes: int = 32 * 1024 * 1024, allow_local_images: bool = False):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="mllama", version=getattr(model, "__version__", "0"))
    queue = GenerationQueue(model, max_queue)
    model_id = model.name
    limits = {"max_body_bytes": max_body_bytes, "allow_local_images": allow_local_images}

    def error(exc: BaseException) -> JSONResponse:
        status, body, headers = error_body(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": queue.waiting}

    openai_routes.register(app, queue, model_id, limits, error)
    ollama_routes.register(app, queue, model_id, limits, error)
    return app


def serve(model, host: str = "127.0.0.1", port: int = 8080, **kwargs: Any) -> None:
    import uvicorn

    uvicorn.run(create_app(model, **kwargs), host=host, port=port, log_level="warning")
