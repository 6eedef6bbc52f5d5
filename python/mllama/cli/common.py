"""What the commands share: model, sampling and constraint flags, loading the model a command names,
checking image paths, and printing a streamed reply."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .._native.errors import MllamaError
from ..generation.results import TextStream
from ..generation.sampling import SamplingParams
from ..model import Model
from ..ollama_store import manifest_path, store_root
from ..settings import environment

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
                 "seed", "max_tokens", "stop")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (argparse's type for --port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, not {port}")
    return port


def model_arg(value: str | None) -> str:
    """A GGUF path; a name like llama3.2-vision[:TAG] that is not a file resolves in the Ollama store."""
    model = value or environment().model
    if not model:
        raise MllamaError("no model given: pass -m/--model or set MLLAMA_MODEL")
    looks_like_path = model.startswith(("/", ".", "~")) or model.endswith(".gguf") or Path(model).exists()
    if model.startswith("ollama:") or looks_like_path:
        return model
    try:
        manifest = manifest_path(store_root(), model)
    except MllamaError:  # not an Ollama name: a path that does not exist, said as such when it is opened
        return model
    # a name with a tag, or one the store has under another tag: the store says which tags it has
    if manifest.is_file() or ":" in model or manifest.parent.is_dir():
        return "ollama:" + model
    if "/" in model or os.sep in model:  # more likely a path: said as such when it is opened
        return model
    raise MllamaError(f"'{model}' is neither a file nor a model in the Ollama store ({store_root()}): pass a GGUF "
                      "file's path, or pull the model with Ollama first")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model",
                   help="a GGUF file or an Ollama model name like llama3.2-vision:11b (default: $MLLAMA_MODEL)")
    p.add_argument("--projector", help="the projector file of an Ollama 0.4-0.6 text model")
    p.add_argument("--device", default=None, help="the vision tower's device and the GPU for the text layers: "
                   "auto, cpu or a device name (default: $MLLAMA_DEVICE, else auto)")
    p.add_argument("--rpc", help="ggml RPC workers host:port,host:port (`mllama rpc-server`; default $MLLAMA_RPC)")
    add_rpc_timeout_flags(p)
    p.add_argument("--devices", help="the devices the text layers are split over, in order (e.g. RPC0,RPC1,CPU)")
    p.add_argument("--tensor-split", help="their shares of the text layers, e.g. 3,1 (default: their free memory)")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="text layers on the device list (default: all)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default min(trained, 4096))")
    p.add_argument("-v", "--verbose", action="store_true", help="show time to first token and tokens/s")


def add_rpc_timeout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc-timeout", type=float, default=None,
                   help="seconds to wait for an RPC worker to accept the connection (default 10)")
    p.add_argument("--rpc-io-timeout", type=int, default=None,
                   help="seconds an RPC worker may take to answer one call before it counts as lost (default 600)")


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


def constraint_from(args: argparse.Namespace) -> dict:
    """compile_grammar's keywords from --json-schema FILE (strict JSON schema) or --grammar FILE (Lark);
    files are read and parsed here, before the model loads."""
    if getattr(args, "json_schema", None):
        path = Path(args.json_schema)
        try:
            schema = json.loads(read_flag_file(path, "--json-schema"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": path.stem, "schema": schema, "strict": True}}}
    if getattr(args, "grammar", None):
        return {"grammar": read_flag_file(Path(args.grammar), "--grammar")}
    return {}


def read_flag_file(path: Path, flag: str) -> str:
    """The text of a file a flag names; errors name the flag and the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


def sampling_from(args: argparse.Namespace) -> dict:
    """The sampling flags given, checked before any model loads (ValueError: a one-line error)."""
    sampling = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k, None) is not None}
    SamplingParams().with_overrides(**sampling)
    return sampling


def placement_from(args: argparse.Namespace) -> dict:
    """The device placement flags as Model keyword arguments."""
    return {"device": args.device, "rpc": args.rpc, "devices": args.devices, "tensor_split": args.tensor_split,
            "n_gpu_layers": args.n_gpu_layers, "rpc_timeout": args.rpc_timeout, "rpc_io_timeout": args.rpc_io_timeout}


def load_model(args: argparse.Namespace, **params) -> Model:
    try:
        return Model(model_arg(args.model), projector=getattr(args, "projector", None), n_ctx=args.ctx,
                     **placement_from(args), **params)
    except (MllamaError, ValueError) as exc:  # the Python keyword said as the flag that sets it (--ctx -5)
        if not re.search(r"\bn_ctx\b", str(exc)):
            raise
        raise MllamaError(re.sub(r"\bn_ctx\b", "--ctx", str(exc))) from None


def check_images(paths: list[str]) -> list[str]:
    for p in paths:
        if Path(p).is_dir():
            raise MllamaError(f"image {p} is a directory")
        if not Path(p).is_file():
            raise MllamaError(f"no such image file: {p}")
    return paths


def print_stream(pieces: TextStream, verbose: bool) -> str:
    """Write a reply as it comes; with verbose, its timings to stderr. Returns the text."""
    text = []
    for piece in pieces:
        text.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = pieces.result
    if verbose and result is not None and result.usage.completion_tokens:
        n = result.usage.completion_tokens
        print(f"[{n} tokens, time to first token {result.timings.prompt_s:.2f} s, "
              f"{result.timings.tokens_per_s(n):.1f} tok/s]", file=sys.stderr)
    return "".join(text)
