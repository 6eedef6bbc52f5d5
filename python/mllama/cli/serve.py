"""`mllama serve`: the OpenAI-compatible and Ollama-compatible HTTP server. Needs the `server` extra."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys

from .._native.errors import MllamaError
from ..server import serve
from ..server.app import Stopped
from .common import add_model_flags, human, load_model, port_number

OLLAMA_PORT = 11434


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server (needs: pip install mllama[server])")
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="the model, as -m gives it (`mllama serve x.gguf`)")
    add_model_flags(p)
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=None, help=f"port (default 8080; {OLLAMA_PORT} with --ollama)")
    p.add_argument("--ollama", action="store_true",
                   help=f"bind Ollama's default address (127.0.0.1:{OLLAMA_PORT}) so Ollama's clients work unchanged")
    p.add_argument("--allow-local-images", action="store_true", help="accept image_url parts naming local files")
    p.add_argument("--parallel", type=int, default=None,
                   help="requests generated together, each with its own n_ctx cache (default: up to 4, as many as "
                        "a quarter of the free memory holds)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait for a sequence (default 8)")
    p.add_argument("--max-body", type=int, default=32, help="largest request body in MiB (default 32)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin whose pages may call the server (CORS; repeatable, * for any). Pages served "
                        "from this machine (localhost, 127.0.0.1) and app://, file://, tauri:// and "
                        "vscode-webview:// pages may always, as with Ollama")
    p.set_defaults(func=run)


def address(args: argparse.Namespace) -> tuple[str, int]:
    """The host and port to bind: the flags given, else 127.0.0.1 and 8080 (11434 with --ollama)."""
    port = args.port if args.port is not None else OLLAMA_PORT if args.ollama else 8080
    host = args.host or "127.0.0.1"
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host, port  # [::1] as in a URL


def bind(host: str, port: int, ollama: bool) -> socket.socket:
    """The server's socket, bound before the model loads (a clear message when the address cannot be); port 0
    picks a free port, read back from it (the banner had said port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        hint = " (Ollama itself may be running: stop it, or pass --port)" if ollama or port == OLLAMA_PORT else ""
        raise MllamaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return s


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # the `server` extra
        raise MllamaError(f"the server needs {' and '.join(missing)}: pip install 'mllama[server]'")
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise MllamaError(f"two models given ({args.model_path} and -m {args.model}): serve one")
        args.model = args.model_path
    for flag, value, least in (("--parallel", args.parallel, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-body", args.max_body, 1)):
        if value is not None and value < least:
            raise MllamaError(f"{flag} must be at least {least}")
    host, port = address(args)
    with bind(host, port, args.ollama) as sock:
        port = sock.getsockname()[1]
        try:
            model = load_model(args, n_seq_max=args.parallel or "auto")
        except MllamaError as exc:  # the context's own limit on sequences, said with the flag that sets it
            raise MllamaError(str(exc).replace("n_seq_max", "--parallel")) from None
        return serve_model(args, model, host, port, sock)


def serve_model(args: argparse.Namespace, model, host: str, port: int, sock: socket.socket) -> int:
    with model:
        kv, url = model.memory()["kv_cache"], f"http://{f'[{host}]' if ':' in host else host}:{port}"
        at_once = "1 request" if model.n_seq_max == 1 else f"{model.n_seq_max} requests"
        print(f"mllama serve: {model.name} on {url} (OpenAI /v1, Ollama /api), {at_once} at a time "
              f"({human(kv)} of KV cache for {model.n_ctx} tokens each; Ctrl-C to stop)", file=sys.stderr)
        try:
            serve(model, host=host, port=port, sock=sock, max_queue=args.max_queue,
                  max_body_bytes=args.max_body * 2**20, allow_local_images=args.allow_local_images,
                  allow_origins=args.allow_origin)
        except Stopped:  # SIGTERM (docker stop, systemd): shut down gracefully, the model closed
            print("mllama serve: stopped", file=sys.stderr)
    return 0
