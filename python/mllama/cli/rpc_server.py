"""`mllama rpc-server`: serve this machine's devices to other mllama processes over ggml's RPC
protocol (ggml_backend_rpc_start_server), for models split across machines (`--rpc` on the client)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
from pathlib import Path

from .._native.errors import MllamaError
from .._native.placement import rpc_supported, serve
from .common import port_number

NO_AUTH_WARNING = ("mllama rpc-server: WARNING: bound to {host}, reachable from other machines. ggml's RPC protocol "
                   "has no authentication and no encryption: anyone who reaches this port can run code on its "
                   "devices and read what they hold. Bind 127.0.0.1 (the default) or use it on a trusted network only.")


def add_parser(sub) -> None:
    p = sub.add_parser("rpc-server",
                       help="serve this machine's devices to mllama clients (ggml RPC; no authentication)")
    p.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address or name to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=50052, help="port (default 50052)")
    p.add_argument("--device", default="", help="devices to serve, comma list (default: the first GPU, else the CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the physical cores)")
    p.add_argument("--cache", default=None, help="directory for ggml's tensor cache (weights sent once, by hash)")
    p.set_defaults(func=run)


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def bind_address(host: str) -> str:
    """--host as the numeric IPv4 address that ggml's RPC server binds ("localhost" -> "127.0.0.1")."""
    try:
        found = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        found = []
    if not found:
        raise ValueError(f"--host {host}: not an IPv4 address nor a name that has one (ggml's RPC server listens "
                         "on IPv4 only: 127.0.0.1, 0.0.0.0 or one of this machine's addresses)")
    return found[0][4][0]


def cache_directory(value: str | None) -> str | None:
    """--cache as a directory that exists (made, with its parents, if need be); "~" expanded."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--cache {value}: not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--cache {value}: {exc.strerror or exc}") from None
    return str(path)


def run(args: argparse.Namespace) -> int:
    if not rpc_supported():
        raise MllamaError("this ggml was built without its RPC backend: reinstall libggml-python with "
                          "CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --no-binary libggml-python libggml-python "
                          "(README: Several machines)")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535 (got {args.port})")
    address = bind_address(args.host)
    cache = cache_directory(args.cache)
    if not is_loopback(address):
        print(NO_AUTH_WARNING.format(host=address), file=sys.stderr)
    endpoint = f"{address}:{args.port}"
    failure: list[BaseException] = []

    def serve_forever() -> None:  # in a thread: the main one stays free for Ctrl-C
        try:
            serve(endpoint, args.device or None, args.threads, cache)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    worker = threading.Thread(target=serve_forever, name="mllama-rpc-server", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failure:
        raise failure[0]
    return 1
