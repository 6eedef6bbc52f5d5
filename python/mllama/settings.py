"""The environment, read in one place. Every MLLAMA_* variable the package honours is listed here and
read when a Model (or a command) starts, never deep inside the runtime; explicit arguments win.

Three test and bench switches are the exception, read by the native library where it picks a CPU kernel
family or form (csrc/kernels/dispatch.cpp), so that one process can test several: MLLAMA_AVX512=0 (an AVX-512
CPU runs the kernels' AVX2 forms), MLLAMA_AMX_EMULATE=1 (the AMX tile kernels run on emulated tiles) and
MLLAMA_PREFETCH_L1=0 or 1 (the Q4_K kernel's AVX-512 form prefetches its weights into L1 too, or not: by default
on Intel CPUs only)."""

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
    repack_text: str | None    # MLLAMA_REPACK: 0 keep every weight in the file mapping, amx (2): ggml's AMX layout too
    image_cache_dir: str | None    # MLLAMA_IMAGE_CACHE_DIR: keep encoded images in this directory too
    image_cache_bytes_text: str | None  # MLLAMA_IMAGE_CACHE_BYTES: memory budget of the image cache (0: off)
    rpc: str | None            # MLLAMA_RPC: ggml RPC workers "host:port,host:port" (Model(rpc=...))
    device: str | None         # MLLAMA_DEVICE: the default of Model(device=...): auto, cpu or a device name

    # parsed when asked for, so that a keyword argument that overrides a variable leaves its value unread (a bad
    # one had failed the Model anyway)
    @property
    def repack(self) -> int:
        return repack_mode(self.repack_text or "1", "MLLAMA_REPACK")

    @property
    def image_cache_bytes(self) -> int | None:
        text = self.image_cache_bytes_text
        return parse_bytes(text, "MLLAMA_IMAGE_CACHE_BYTES") if text else None


def repack_mode(value: bool | int | str, source: str = "repack") -> int:
    """mllama_model_params.repack from Model(repack=...) or MLLAMA_REPACK: 0 (False, "0"): every weight in the file
    mapping; 1 (True, "1", the default): quantized text matrices in ggml's extra CPU layouts but its AMX one; 2
    ("amx"): ggml's AMX int8 layout first (a native ggml build on an AMX CPU; csrc/model/repack.h says why it is
    not the default). Anything else: ValueError naming `source`."""
    if isinstance(value, int) and value in (0, 1, 2):  # bools too
        return int(value)
    modes = {"0": 0, "1": 1, "2": 2, "amx": 2, "false": 0, "true": 1}
    if not isinstance(value, str) or value.strip().lower() not in modes:
        raise ValueError(f"{source} must be 1 (true), 0 (false) or amx (2), not {value!r}")
    return modes[value.strip().lower()]


def environment() -> Environment:
    env = os.environ
    return Environment(model=env.get("MLLAMA_MODEL") or None, dump_dir=env.get("MLLAMA_DUMP_DIR") or None,
                       dump_filter=env.get("MLLAMA_DUMP_FILTER") or None, profile=env.get("MLLAMA_PROFILE") or None,
                       cpu_kernels=env.get("MLLAMA_CPU_KERNELS") or None,
                       repack_text=env.get("MLLAMA_REPACK") or None,
                       image_cache_dir=env.get("MLLAMA_IMAGE_CACHE_DIR") or None,
                       image_cache_bytes_text=env.get("MLLAMA_IMAGE_CACHE_BYTES") or None,
                       rpc=env.get("MLLAMA_RPC") or None, device=env.get("MLLAMA_DEVICE") or None)


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
