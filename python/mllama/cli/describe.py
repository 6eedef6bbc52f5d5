"""`mllama describe`: one-shot descriptions of images, streamed (or one JSON object per image)."""

from __future__ import annotations

import argparse
import json
import sys

from .._native.errors import ImageError
from .common import (add_model_flags, add_sampling_flags, check_images, constraint_from, load_model, print_stream,
                     sampling_from)


def add_parser(sub) -> None:
    p = sub.add_parser("describe", help="describe images, one after the other")
    add_model_flags(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of streamed text")
    p.add_argument("--json-schema", metavar="FILE",
                   help="answer with JSON that validates against this JSON schema (structured output)")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = sampling_from(args)
    images = check_images(args.images)
    constraint = constraint_from(args)
    failed = 0
    with load_model(args) as model:
        sampling = {**options, "grammar": model.compile_grammar(**constraint)}  # compiled once
        for path in images:
            try:
                describe_one(model, path, args, sampling, len(images))
            except ImageError as exc:  # this image only: the others are still described (exit status 1)
                failed += 1
                print(json.dumps({"image": path, "error": str(exc)}) if args.json else f"mllama: error: {exc}",
                      file=sys.stdout if args.json else sys.stderr)
    return 1 if failed else 0


def describe_one(model, path: str, args: argparse.Namespace, sampling: dict, n_images: int) -> None:
    if args.json:
        content = [{"type": "image", "image": path}, {"type": "text", "text": args.prompt}]
        reply = model.chat([{"role": "user", "content": content}], **sampling)
        print(json.dumps({"image": path, "description": reply["choices"][0]["message"]["content"],
                          "finish_reason": reply["choices"][0]["finish_reason"], "usage": reply["usage"]}))
        return
    if n_images > 1:
        print(f"== {path}")
    chat = model.chat_session(**sampling)
    print_stream(chat.send(args.prompt, images=[path], stream=True), args.verbose)
