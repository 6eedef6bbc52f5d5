"""`mllama info`: a model's hyperparameters, tensors and format; the devices and CPU features."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict

from .._native.cpu_features import cpu_report, warning
from .._native.errors import MllamaError
from .._native.placement import Placement
from .._native.system import devices, system_info
from ..model import Model
from ..settings import environment
from .common import add_rpc_timeout_flags, human, model_arg, placement_from

FORMATS = {0: "mllama", 1: "ollama", 2: "ollama-split"}


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a model's hyperparameters, tensors and the devices")
    p.add_argument("model", nargs="?", help="a GGUF file (default: $MLLAMA_MODEL); none: list devices")
    p.add_argument("-m", "--model", dest="model_opt", help=argparse.SUPPRESS)
    p.add_argument("--projector", help="the projector file of an Ollama 0.4-0.6 text model")
    p.add_argument("--device", help="the device, as the other commands take it (default $MLLAMA_DEVICE, else auto): "
                                    "the placement shown is the one they load")
    p.add_argument("--rpc", help="ggml RPC workers host:port,host:port (default $MLLAMA_RPC)")
    add_rpc_timeout_flags(p)
    p.add_argument("--devices", help="the devices the text layers are split over, in order")
    p.add_argument("--tensor-split", help="their shares of the text layers (default: their free memory)")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="text layers on the device list (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def print_devices() -> None:
    print("devices:")
    for d in devices():
        mem = f", {human(d['memory_free'])} free of {human(d['memory_total'])}" if d["memory_total"] else ""
        print(f"  {d['name']} ({d['type']}): {d['description']}{mem}")
    print(f"ggml: {system_info()}")
    report = cpu_report()
    if not report["mllama_kernels_built"]:
        kernels = "not in this build (x86-64 only: ggml's ops run instead)"
    elif report["mllama_kernels"]:
        kernels = "AVX-512 BF16" + (" + AMX tiles" if report["mllama_amx_tiles"] else "") + \
            " (vision attention, BF16-weight GEMMs, GELU; decode cross-attention, Q6_K products)"
    elif report["mllama_avx2_kernels"]:
        kernels = "AVX2 (vision attention, BF16-weight GEMMs, GELU; this CPU lacks AVX-512 BF16)"
    else:
        kernels = "off (this CPU lacks AVX2 with FMA)"
    print(f"cpu: {report['machine']}, supports {' '.join(report['cpu_supports']) or 'unknown'}; "
          f"GEMM path: {report['gemm_path']}; mllama kernels: {kernels}")
    note = warning(report)
    if note:
        print(note, file=sys.stderr)


def model_summary(model: Model) -> dict:
    info = model.info
    tensors = model.tensors()
    return {
        "path": str(model.path), "name": info["name"], "file_size": info["file_size"],
        "n_params": info["n_params"], "n_tensors": info["n_tensors"], "bytes_weights": info["n_bytes_weights"],
        "tensor_types": dict(Counter(t.type for t in tensors)), "device": info["device"],
        "n_threads": info["n_threads"], "use_mmap": bool(info["use_mmap"]), "hparams": model.hparams.as_dict(),
        "format": FORMATS.get(info["format"], "unknown"),
        "conventions": info["conventions"], "projector": str(model.projector) if model.projector else None,
        "op_paths": model.op_paths(), "placement": [asdict(p) for p in model.placement],
    }


def print_summary(summary: dict) -> None:
    hp = summary["hparams"]
    print(f"model: {summary['path']} ({summary['name'] or 'unnamed'})")
    if summary["projector"]:
        print(f"  projector: {summary['projector']}")
    print(f"  format: {summary['conventions']}")
    print(f"  file: {human(summary['file_size'])}, {summary['n_tensors']} tensors, "
          f"{summary['n_params'] / 1e6:.1f} M parameters, {human(summary['bytes_weights'])} of weights")
    print("  tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary["tensor_types"].items())))
    print(f"  text: {hp['n_layer']} layers (cross-attention at {list(hp['cross_attention_layers'])}), "
          f"n_embd {hp['n_embd']}, n_ff {hp['n_ff']}, heads {hp['n_head']}/{hp['n_head_kv']}, "
          f"vocab {hp['n_vocab']} logits / "
          f"{hp['n_vocab_embd']} embedding rows / {hp['n_tokens']} tokens, context {hp['n_ctx_train']}")
    print(f"  vision: {hp['v_n_layer']} local + {hp['v_n_global_layer']} global layers, n_embd {hp['v_n_embd']}, "
          f"heads {hp['v_n_head']}, tile {hp['v_image_size']}px / patch {hp['v_patch_size']}px, "
          f"up to {hp['v_max_tiles']} tiles, "
          f"intermediate layers {list(hp['intermediate_layers'])}, output dim {hp['v_output_dim']}")
    print(f"  tokens: bos {hp['bos_token_id']}, eos {hp['eos_token_id']}, eot {hp['eot_token_id']}, "
          f"eom {hp['eom_token_id']}, pad {hp['pad_token_id']}, image {hp['image_token_id']}")
    mmap = "on" if summary["use_mmap"] else "off"
    print(f"  runtime: device {summary['device']}, {summary['n_threads']} threads, mmap {mmap}")
    print("  placement:")
    for entry in summary["placement"]:
        print(f"    {Placement(**entry).describe()}")
    print("  ops on this machine:")
    for family, path in summary["op_paths"].items():
        print(f"    {family}: {path}")


def run(args: argparse.Namespace) -> int:
    if args.model_opt and args.model and args.model_opt != args.model:  # (the positional one had been ignored)
        raise MllamaError(f"two models given ({args.model} and -m {args.model_opt}): name one")
    target = args.model_opt or args.model
    if not target and not environment().model:
        if args.json:
            print(json.dumps({"devices": devices(), "ggml": system_info(), "cpu": cpu_report()}, indent=2))
        else:
            print_devices()
        return 0
    with Model(model_arg(target), projector=args.projector, **placement_from(args)) as model:
        summary = model_summary(model)
    if args.json:
        summary["devices"] = devices()
        print(json.dumps(summary, indent=2))
        return 0
    print_summary(summary)
    print_devices()
    return 0
