"""The `mllama` command line: chat, describe, serve, demo, bench, convert, info."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from . import __version__
from ._lib import MllamaError, devices, system_info


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _model_arg(value: str | None) -> str:
    """A GGUF path; a name like llama3.2-vision[:TAG] that is not a file resolves in the Ollama store."""
    model = value or os.environ.get("MLLAMA_MODEL")
    if not model:
        raise MllamaError("no model given: pass -m/--model or set MLLAMA_MODEL")
    looks_like_path = model.startswith(("/", ".", "~")) or model.endswith(".gguf") or Path(model).exists()
    if not model.startswith("ollama:") and not looks_like_path:
        from .ollama import manifest_path, store_root

        if manifest_path(store_root(), model).is_file():
            return "ollama:" + model
    return model


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.hf_dir, args.output, type=args.type, vision_type=args.vision_type, force=args.force,
                  progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out} ({_human(out.stat().st_size)})")
    return 0


def _print_devices() -> None:
    print("devices:")
    for d in devices():
        mem = f", {_human(d['memory_free'])} free of {_human(d['memory_total'])}" if d["memory_total"] else ""
        print(f"  {d['name']} ({d['type']}): {d['description']}{mem}")
    print(f"ggml: {system_info()}")
    from .cpu_features import cpu_report, warning

    report = cpu_report()
    print(f"cpu: supports {' '.join(report['cpu_supports']) or 'unknown'}; GEMM path: {report['gemm_path']}; "
          f"mllama AVX-512 BF16 kernels (vision attention, BF16-weight GEMMs, GELU, decode cross-attention): "
          f"{'on' if report['mllama_kernels'] else 'off'}")
    note = warning(report)
    if note:
        print(note, file=sys.stderr)


def _model_summary(model) -> dict:
    info, hp = model.info, model.hparams
    tensors = model.tensors()
    return {
        "path": str(model.path), "name": info["name"], "file_size": info["file_size"],
        "n_params": info["n_params"], "n_tensors": info["n_tensors"], "bytes_weights": info["n_bytes_weights"],
        "tensor_types": dict(Counter(t.type for t in tensors)), "device": info["device"],
        "n_threads": info["n_threads"], "use_mmap": bool(info["use_mmap"]), "hparams": hp,
        "format": {0: "mllama", 1: "ollama", 2: "ollama-split"}.get(info["format"], "unknown"),
        "conventions": info["conventions"], "projector": str(model.projector) if model.projector else None,
    }


def cmd_info(args: argparse.Namespace) -> int:
    from .model import Model

    if not args.model and not os.environ.get("MLLAMA_MODEL"):
        _print_devices()
        return 0
    with Model(_model_arg(args.model), projector=args.projector, device=args.device) as model:
        summary = _model_summary(model)
    if args.json:
        summary["devices"] = devices()
        print(json.dumps(summary, indent=2))
        return 0
    hp = summary["hparams"]
    print(f"model: {summary['path']} ({summary['name'] or 'unnamed'})")
    if summary["projector"]:
        print(f"  projector: {summary['projector']}")
    print(f"  format: {summary['conventions']}")
    print(f"  file: {_human(summary['file_size'])}, {summary['n_tensors']} tensors, {summary['n_params'] / 1e6:.1f} M parameters, "
          f"{_human(summary['bytes_weights'])} of weights")
    print("  tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary["tensor_types"].items())))
    print(f"  text: {hp['n_layer']} layers (cross-attention at {hp['cross_attention_layers']}), n_embd {hp['n_embd']}, "
          f"n_ff {hp['n_ff']}, heads {hp['n_head']}/{hp['n_head_kv']}, vocab {hp['n_vocab']} logits / "
          f"{hp['n_vocab_embd']} embedding rows / {hp['n_tokens']} tokens, context {hp['n_ctx_train']}")
    print(f"  vision: {hp['v_n_layer']} local + {hp['v_n_global_layer']} global layers, n_embd {hp['v_n_embd']}, "
          f"heads {hp['v_n_head']}, tile {hp['v_image_size']}px / patch {hp['v_patch_size']}px, up to {hp['v_max_tiles']} tiles, "
          f"intermediate layers {hp['intermediate_layers']}, output dim {hp['v_output_dim']}")
    print(f"  tokens: bos {hp['bos_token_id']}, eos {hp['eos_token_id']}, eot {hp['eot_token_id']}, "
          f"eom {hp['eom_token_id']}, pad {hp['pad_token_id']}, image {hp['image_token_id']}")
    print(f"  runtime: device {summary['device']}, {summary['n_threads']} threads, mmap {'on' if summary['use_mmap'] else 'off'}")
    _print_devices()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise MllamaError(f"the server needs FastAPI and uvicorn: pip install 'mllama[server]' ({exc})") from None
    from .cli_chat import load_model

    with load_model(args) as model:
        print(f"mllama serve: {model.name} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
        serve(model, host=args.host, port=args.port, max_queue=args.max_queue, max_body_bytes=args.max_body * 2**20,
              allow_local_images=args.allow_local_images)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .dtypes import writable_type_names

    parser = argparse.ArgumentParser(prog="mllama", description="Llama 3.2 Vision on ggml")
    parser.add_argument("--version", action="version", version=f"mllama {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to GGUF")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors, tokenizer.json, ...")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    text_types = writable_type_names() + ["q4_k_m", "q5_k_m"]
    p.add_argument("--type", default="f16", choices=text_types, metavar="TYPE",
                   help="type of the text weights: " + ", ".join(text_types) + " (default f16; q4_k_m is the usual choice)")
    p.add_argument("--vision-type", choices=["f32", "f16", "bf16"], default=None,
                   help="type of the vision tower and projector matrices (default: f32 for --type f32, else f16)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    from .cli_chat import HELP, add_sampling_flags, cmd_chat, cmd_describe

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("-m", "--model", help="a GGUF file or an Ollama model name like llama3.2-vision:11b (default: $MLLAMA_MODEL)")
        p.add_argument("--projector", help="the projector file of an Ollama 0.4-0.6 text model")
        p.add_argument("--device", default="auto", help="compute device: auto, cpu or a device name (default auto)")
        p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default min(trained, 4096))")
        p.add_argument("-v", "--verbose", action="store_true", help="show time to first token and tokens/s")

    p = sub.add_parser("chat", help="interactive chat (or one answer for a prompt piped on stdin)",
                       epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p)
    p.add_argument("--image", action="append", help="attach an image to the first message (repeatable)")
    p.add_argument("--system", help="system prompt (the template refuses it together with images)")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("describe", help="describe images, one after the other")
    model_flags(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of streamed text")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install mllama[server])")
    model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allow-local-images", action="store_true", help="accept image_url parts naming local files")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait for the model (default 8)")
    p.add_argument("--max-body", type=int, default=32, help="largest request body in MiB (default 32)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the whole pipeline on a small random-weight model (no download)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the generated text")
    p.set_defaults(func=lambda a: __import__("mllama.demo", fromlist=["run_demo"]).run_demo(quiet=a.quiet))

    p = sub.add_parser("bench", help="image encode time, prompt and decode tokens/s, peak memory")
    model_flags(p)
    p.add_argument("--image", help="image to encode (default: a generated test image)")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--decode", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: __import__("mllama.cli_bench", fromlist=["cmd_bench"]).cmd_bench(a))

    p = sub.add_parser("info", help="show a model's hyperparameters, tensors and the devices")
    p.add_argument("model", nargs="?", help="a GGUF file (default: $MLLAMA_MODEL); none: list devices")
    p.add_argument("-m", "--model", dest="model_opt", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="device to load on (default cpu)")
    p.add_argument("--projector", help="the projector file of an Ollama 0.4-0.6 text model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_opt", None):
        args.model = args.model_opt
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="mllama: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MllamaError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"mllama: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
