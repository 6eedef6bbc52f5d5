"""`mllama chat`: an interactive REPL (/image, /clear, /save, /help, /exit), or one answer when
stdin is not a terminal."""

from __future__ import annotations

import argparse
import atexit
import json
import shlex
import sys
from pathlib import Path

from .._native.errors import MllamaError
from ..settings import cache_dir
from .common import (add_model_flags, add_sampling_flags, check_images, constraint_from, load_model, print_stream,
                     sampling_from)

HELP = """commands:
  /image PATH   attach an image to the next message
  /clear        forget the conversation
  /save FILE    write the conversation as JSON (/save! FILE replaces an existing file)
  /help         this help
  /exit         quit (also Ctrl-D; Ctrl-C stops a reply, twice at the prompt quits)
  //text        send "/text" (a message that starts with a slash)"""


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat (or one answer for a prompt piped on stdin)",
                       epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--image", action="append", help="attach an image to the first message (repeatable)")
    p.add_argument("--system", help="system prompt (the template refuses it together with images)")
    p.add_argument("--grammar", metavar="FILE",
                   help="every reply follows this Lark grammar (llguidance's dialect; a regex: start: /.../)")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - not on every platform
        return
    history = cache_dir() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.exists():
            readline.read_history_file(history)
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
        arg = _unquoted(arg)
        if not arg or not Path(arg).expanduser().is_file():
            print(f"no such image file: {arg}")
        else:
            pending.append(str(Path(arg).expanduser()))
            print(f"attached {arg} to the next message")
    elif cmd == "/clear":
        chat.clear()
        pending.clear()
        print("conversation cleared")
    elif cmd in ("/save", "/save!"):
        _save(arg, chat, overwrite=cmd == "/save!")
    else:
        print(f"unknown command {cmd} (/help lists them)")
    return True


def _save(arg: str, chat, overwrite: bool) -> None:
    """/save FILE: the conversation as JSON, never over an existing file (/save! FILE replaces it); a file that
    cannot be written is reported, and the chat goes on."""
    if not arg:
        print("usage: /save FILE (/save! FILE replaces an existing file)")
        return
    path = Path(arg).expanduser()
    if path.is_dir():
        print(f"cannot save to {arg}: it is a folder")
        return
    try:
        with open(path, "w" if overwrite else "x") as f:
            f.write(json.dumps(_serializable(chat.messages), indent=2) + "\n")
    except FileExistsError:
        print(f"{arg} exists: /save! {arg} replaces it")
        return
    except OSError as exc:
        print(f"cannot save to {arg}: {exc.strerror or exc}")
        return
    print(f"saved {len(chat.messages)} messages to {arg}")


def _serializable(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [p if p.get("type") == "text" else
                       {"type": "image", "image": getattr(p.get("image"), "source", str(p.get("image")))} for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _unquoted(path: str) -> str:
    """A path as a terminal's drag and drop writes it ('/a b.png', or /a\\ b.png): the file's name. A name that
    is a file as typed is kept as it is."""
    if not path or Path(path).expanduser().exists():
        return path
    try:
        words = shlex.split(path)
    except ValueError:  # an unbalanced quote: as typed
        return path
    return words[0] if len(words) == 1 else path


def run(args: argparse.Namespace) -> int:
    options = sampling_from(args)
    images = check_images(args.image or [])
    constraint = constraint_from(args)
    with load_model(args) as model:
        grammar = model.compile_grammar(**constraint)  # compiled once for every reply
        chat = model.chat_session(system=args.system, grammar=grammar, **options)
        if not sys.stdin.isatty():
            prompt = sys.stdin.read().strip()
            if not prompt:
                raise MllamaError("no prompt on stdin (pipe the message, or run `mllama chat` in a terminal)")
            print_stream(chat.send(prompt, images=images, stream=True), args.verbose)
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
            if line.startswith("/") and not line.startswith("//"):
                if not _command(line, chat, pending):
                    return 0
                continue
            line = line[1:] if line.startswith("//") else line  # "//x" sends "/x"
            n_messages, n_left_out = len(chat.messages), chat.n_left_out
            try:
                stream = chat.send(line, images=pending, stream=True)
                pending = []
                print_stream(stream, args.verbose)
                if chat.n_left_out > n_left_out:
                    print(f"(the context is full: the oldest {chat.n_left_out} messages were left out of the prompt)",
                          file=sys.stderr)
            except KeyboardInterrupt:  # (an image being read then had stayed attached to the next message)
                pending = []
                print("\n[stopped]")
            except (MllamaError, ValueError, OSError) as exc:
                del chat.messages[n_messages:]  # drop the failed turn, whatever of it was recorded
                pending = []
                print(f"error: {exc}")
