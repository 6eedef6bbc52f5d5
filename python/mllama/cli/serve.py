"""`mllama serve`: the OpenAI-compatible (and Ollama /api/chat) HTTP server. Needs the `server` extra."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .._native.errors import MllamaError
from ..server import serve
from .common import add_model_flags, human, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install mllama[server])")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allow-local-images", action="store_true", help="accept image_url parts naming local files")
    p.add_argument("--parallel", type=int, default=None,
                   help="requests generated together, each with its own n_ctx cache (default: up to 4, as many as "
                        "a quarter of the free memory holds)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait for a sequence (default 8)")
    p.add_argument("--max-body", type=int, default=32, help="largest request body in MiB (default 32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # the `server` extra
        raise MllamaError(f"the server needs {' and '.join(missing)}: pip install 'mllama[server]'")
    if args.parallel is not None and args.parallel < 1:
        raise MllamaError("--parallel must be at least 1")
    with load_model(args, n_seq_max=args.parallel or "auto") as model:
        kv = model.memory()["kv_cache"]
        print(f"mllama serve: {model.name} on http://{args.host}:{args.port}/v1, {model.n_seq_max} requests at a time "
              f"({human(kv)} of KV cache for {model.n_ctx} tokens each; Ctrl-C to stop)", file=sys.stderr)
        serve(model, host=args.host, port=args.port, max_queue=args.max_queue, max_body_bytes=args.max_body * 2**20,
              allow_local_images=args.allow_local_images)
    return 0
