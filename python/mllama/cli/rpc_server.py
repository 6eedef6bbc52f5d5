"""`mllama rpc-server`: serve this machine's devices to other mllama processes over ggml's RPC
protocol (ggml_backend_rpc_start_server), for models split across machines (`--rpc` on the client)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading

from .._native.errors import MllamaError
from .._native.placement import rpc_supported, serve
from .common import port_number

NO_AUTH_WARNING = ("mllama rpc-server: WARNING: bound to {host}, reachable from other machines. ggml's RPC protocol "
                   "has no authentication and no encryption: anyone who reaches this port can run code on its "
                   "devices and read what they hold. Bind 127.0.0.1 (the default) or use it on a trusted network only.")


def add_parser(sub) -> None:
    p = sub.add_parser("rpc-server",
                       help="serve this machine's devices to mllama clients (ggml RPC; no authentication)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=50052, help="port (default 50052)")
    p.add_argument("--device", default="", help="devices to serve, comma list (default: the first GPU, else the CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the physical cores)")
    p.add_argument("--cache", default=None, help="directory for ggml's tensor cache (weights sent once, by hash)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    if not rpc_supported():
        raise MllamaError("this ggml was built without its RPC backend: reinstall libggml-python with "
                          "CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --no-binary libggml-python libggml-python "
                          "(README: Several machines)")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535 (got {args.port})")
    if not is_loopback(args.host):
        print(NO_AUTH_WARNING.format(host=args.host), file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    endpoint = f"{host}:{args.port}"
    failure: list[BaseException] = []

    def serve_forever() -> None:  # in a thread: the main one stays free for Ctrl-C
        try:
            serve(endpoint, args.device or None, args.threads, args.cache)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    worker = threading.Thread(target=serve_forever, name="mllama-rpc-server", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failure:
        raise failure[0]
    return 1
