"""The `mllama` command line: one module per command (chat, describe, serve, demo, bench, convert,
info, rpc-server), each with `add_parser(sub)` and `run(args)`; common.py holds what they share."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .._native.errors import MllamaError
from .._version import __version__
from . import bench, chat, convert, demo, describe, info, rpc_server, serve

COMMANDS = (convert, chat, describe, serve, demo, bench, info, rpc_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllama", description="Llama 3.2 Vision on ggml")
    parser.add_argument("--version", action="version", version=f"mllama {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stdin is None:  # started with it closed (`mllama chat <&-`): read as empty, not an AttributeError
        sys.stdin = open(os.devnull)
    if sys.stdout is None:  # (`>&-`): what it writes goes nowhere, as into a pipe whose reader went away
        sys.stdout = open(os.devnull, "w")
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a reply the terminal's encoding lacks (cp1252): "?", not an error
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="mllama: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mllama info | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except (MllamaError, OSError, ValueError) as exc:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        print(f"mllama: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
