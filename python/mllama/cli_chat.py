"""`mllama chat` (an interactive REPL, or one answer when stdin is not a terminal) and
`mllama describe` (one-shot descriptions of images, streamed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HELP = """commands:
  /image PATH   attach an image to the next message
  /clear        forget the conversation
  /save FILE    write the conversation as JSON
  /help         this help
  /exit         quit (also Ctrl-D; Ctrl-C stops a reply, twice at the prompt quits)"""


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model file's generation config)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repeat-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling_from(args: argparse.Namespace) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
            "seed", "max_tokens", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_model(args: argparse.Namespace):
    from .cli import _model_arg
    from .model import Model

    return Model(_model_arg(args.model), projector=getattr(args, "projector", None), n_ctx=args.ctx, device=args.device)


def _check_images(paths: list[str]) -> list[str]:
    from ._lib import MllamaError

    for p in paths:
        if not Path(p).is_file():
            raise MllamaError(f"no such image file: {p}")
    return paths


def _stream(pieces, verbose: bool, model) -> str:
    start, first, text = time.perf_counter(), None, []
    for piece in pieces:
        if first is None:
            first = time.perf_counter()
        text.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose and first is not None:
        n = model.last_usage["completion_tokens"]
        gen = time.perf_counter() - first
        print(f"[{n} tokens, time to first token {first - start:.2f} s, {max(n - 1, 0) / gen if gen > 0 else 0:.1f} tok/s]",
              file=sys.stderr)
    return "".join(text)


def cmd_describe(args: argparse.Namespace) -> int:
    images = _check_images(args.images)
    with load_model(args) as model:
        for path in images:
            if args.json:
                reply = model.chat([{"role": "user", "content": [{"type": "image", "image": path},
                                                                  {"type": "text", "text": args.prompt}]}], **sampling_from(args))
                print(json.dumps({"image": path, "description": reply["choices"][0]["message"]["content"],
                                  "finish_reason": reply["choices"][0]["finish_reason"], "usage": reply["usage"]}))
                continue
            if len(images) > 1:
                print(f"== {path}")
            chat = model.chat_session(**sampling_from(args))
            _stream(chat.send(args.prompt, images=[path], stream=True), args.verbose, model)
    return 0


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - not on every platform
        return
    history = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mllama" / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.exists():
            readline.read_history_file(history)
        import atexit

        atexit.register(readline.write_history_file, history)
    except OSError:
        pass


def _command(line: str, chat, pending: list[str]) -> bool:
    """Handle a /command; False means quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/help":
        print(HELP)
    elif cmd == "/image":
        if not arg or not Path(arg).expanduser().is_file():
            print(f"no such image file: {arg}")
        else:
            pending.append(str(Path(arg).expanduser()))
            print(f"attached {arg} to the next message")
    elif cmd == "/clear":
        chat.clear()
        pending.clear()
        print("conversation cleared")
    elif cmd == "/save":
        if not arg:
            print("usage: /save FILE")
        else:
            Path(arg).expanduser().write_text(json.dumps(_serializable(chat.messages), indent=2) + "\n")
            print(f"saved {len(chat.messages)} messages to {arg}")
    else:
        print(f"unknown command {cmd} (/help lists them)")
    return True


def _serializable(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [p if p.get("type") == "text" else {"type": "image", "image": getattr(p.get("image"), "source", str(p.get("image")))} for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def cmd_chat(args: argparse.Namespace) -> int:
    images = _check_images(args.image or [])
    with load_model(args) as model:
        chat = model.chat_session(system=args.system, **sampling_from(args))
        if not sys.stdin.isatty():
            prompt = sys.stdin.read().strip()
            if prompt:
                _stream(chat.send(prompt, images=images, stream=True), args.verbose, model)
            return 0
        _setup_readline()
        print(f"mllama chat: {model.name} ({model.info['device']}). /help for commands, Ctrl-D to quit.")
        pending, interrupted = list(images), False
        while True:
            try:
                line = input("> ")
                interrupted = False
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    print()
                    return 0
                interrupted = True
                print("\n(Ctrl-C again or Ctrl-D to quit)")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not _command(line, chat, pending):
                    return 0
                continue
            from ._lib import MllamaError

            n_messages = len(chat.messages)
            try:
                stream = chat.send(line, images=pending, stream=True)
                pending = []
                _stream(stream, args.verbose, model)
            except KeyboardInterrupt:
                print("\n[stopped]")
            except (MllamaError, ValueError) as exc:
                del chat.messages[n_messages:]  # drop the failed turn, whatever of it was recorded
                pending = []
                print(f"error: {exc}")
