"""The HTTP application: one model whose batch scheduler runs up to n_seq_max requests together
(BatchQueue), OpenAI's and Ollama's routes, /health and /metrics. FastAPI, uvicorn and
prometheus-client (the `server` extra) are imported only here, when an app is made."""

from __future__ import annotations

from typing import Any

from . import completions_routes, ollama_routes, openai_routes
from .metrics import Metrics
from .queue import BatchQueue
from .requests import error_body


def create_app(model, *, max_queue: int = 8, max_body_bytes: int = 32 * 1024 * 1024, allow_local_images: bool = False):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="mllama", version=getattr(model, "__version__", "0"))
    queue = BatchQueue(model, max_queue, Metrics(model))
    model_id = model.name
    limits = {"max_body_bytes": max_body_bytes, "allow_local_images": allow_local_images}

    def error(exc: BaseException) -> JSONResponse:
        status, body, headers = error_body(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health")
    async def health():
        scheduler = model.scheduler
        if model.info["lost_worker"]:  # its weights on that worker are gone: 503 until restarted
            return JSONResponse({"status": "error", "model": model_id,
                                 "error": "an RPC worker holding part of the model failed: restart the server"},
                                status_code=503)
        return {"status": "ok", "model": model_id, "running": len(scheduler.running), "waiting": queue.waiting,
                "sequences": model.n_seq_max}

    @app.get("/metrics")
    async def metrics():
        body, content_type = queue.metrics.render()
        return Response(body, media_type=content_type)

    openai_routes.register(app, queue, model_id, limits, error)
    completions_routes.register(app, queue, model_id, limits, error)
    ollama_routes.register(app, queue, model_id, limits, error)
    return app


def serve(model, host: str = "127.0.0.1", port: int = 8080, **kwargs: Any) -> None:
    import uvicorn

    uvicorn.run(create_app(model, **kwargs), host=host, port=port, log_level="warning")
