"""`mllama convert`: a Hugging Face checkpoint folder to an mllama GGUF file."""

from __future__ import annotations

import argparse
import signal

from .._native.dtypes import writable_type_names
from ..convert import MIXES, VISION_TYPES, convert
from .common import human


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to GGUF")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors, tokenizer.json, ...")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    text_types = writable_type_names() + sorted(MIXES)
    p.add_argument("--type", default="f16", choices=text_types, metavar="TYPE",
                   help="type of the text weights: " + ", ".join(text_types) + " (default f16; q4_k_m is the usual choice)")
    p.add_argument("--vision-type", choices=list(VISION_TYPES), default=None,
                   help="type of the vision tower and projector matrices (default: f32 for --type f32, bf16 for --type "
                        "bf16, else f16)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # SIGTERM (timeout, docker stop, systemd) and SIGHUP end the conversion as Ctrl-C does: through convert's
    # cleanup, which removes its partial file (a signal's default action left it behind)
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig}
    try:
        out = convert(args.hf_dir, args.output, type=args.type, vision_type=args.vision_type, force=args.force,
                      progress=not args.quiet)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if not args.quiet:
        print(f"wrote {out} ({human(out.stat().st_size)})")
    return 0
