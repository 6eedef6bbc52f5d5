"""The environment, read in one place. Every MLLAMA_* variable the package honours is listed here and
read when a Model (or a command) starts, never deep inside the runtime; explicit arguments win.

Two test switches are the exception, read by the native library where it picks a CPU kernel family
(csrc/kernels/dispatch.cpp), so that one process can test several: MLLAMA_AVX512=0 (an AVX-512 CPU runs
the kernels' AVX2 forms) and MLLAMA_AMX_EMULATE=1 (the AMX tile kernels run on emulated tiles)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Environment:
    model: str | None          # MLLAMA_MODEL: the default model of the command line
    dump_dir: str | None       # MLLAMA_DUMP_DIR: write graph nodes as .npy files here
    dump_filter: str | None    # MLLAMA_DUMP_FILTER: regex over node names to dump
    profile: str | None        # MLLAMA_PROFILE: per-op timings written to this TSV file
    cpu_kernels: str | None    # MLLAMA_CPU_KERNELS: "0" none, "1" all, or a list such as "attn,gemm"
    repack: bool               # MLLAMA_REPACK=0: keep every weight in the file mapping
    image_cache_dir: str | None    # MLLAMA_IMAGE_CACHE_DIR: keep encoded images in this directory too
    image_cache_bytes: int | None  # MLLAMA_IMAGE_CACHE_BYTES: memory budget of the image cache (0: off)
    rpc: str | None            # MLLAMA_RPC: ggml RPC workers "host:port,host:port" (Model(rpc=...))
    device: str | None         # MLLAMA_DEVICE: the default of Model(device=...): auto, cpu or a device name


def environment() -> Environment:
    env = os.environ
    return Environment(model=env.get("MLLAMA_MODEL") or None, dump_dir=env.get("MLLAMA_DUMP_DIR") or None,
                       dump_filter=env.get("MLLAMA_DUMP_FILTER") or None, profile=env.get("MLLAMA_PROFILE") or None,
                       cpu_kernels=env.get("MLLAMA_CPU_KERNELS") or None, repack=env.get("MLLAMA_REPACK", "1") != "0",
                       image_cache_dir=env.get("MLLAMA_IMAGE_CACHE_DIR") or None,
                       image_cache_bytes=parse_bytes(env["MLLAMA_IMAGE_CACHE_BYTES"], "MLLAMA_IMAGE_CACHE_BYTES")
                       if env.get("MLLAMA_IMAGE_CACHE_BYTES") else None, rpc=env.get("MLLAMA_RPC") or None,
                       device=env.get("MLLAMA_DEVICE") or None)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int, what: str = "size") -> int:
    """A byte count: an integer, or one with a binary unit K, M, G or T (e.g. "512M", "2GiB")."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:I?B)?", str(text).strip().upper())
    if not match:
        raise ValueError(f"{what}: {text!r} is not a byte count (an integer, or with K, M, G or T)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def cache_dir() -> Path:
    """mllama's own cache folder ($XDG_CACHE_HOME/mllama, else ~/.cache/mllama)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mllama"
