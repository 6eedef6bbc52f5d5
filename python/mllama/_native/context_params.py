"""What a context is made with: the C strings its parameters point to, the sizes checked before loading, the
default number of sequences, and the context itself with its effective sizes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import dtypes as T
from .errors import ModelLoadError
from .ffi import call, ffi, lib


class CStrings:
    """char[] buffers that must outlive a C call taking their pointers."""

    def __init__(self):
        self._keep = []

    def __call__(self, value: str | os.PathLike | None):
        if not value:
            return ffi.NULL
        self._keep.append(ffi.new("char[]", os.fsencode(value)))
        return self._keep[-1]


def auto_sequences(model_ptr, n_ctx: int, kv_f32: int = -1, most: int = 4) -> int:
    """How many sequences to hold by default: up to `most`, as many whose self-attention caches fit in a quarter
    of the host memory free now (caches on a GPU: pass n_seq_max for its memory). `kv_f32` as the context takes
    it (-1: auto; the cache type comes from the C side, which makes the caches)."""
    h = ffi.new("mllama_hparams *")
    call(lib.mllama_model_get_hparams, model_ptr, h)
    n_ctx = min(n_ctx, h.n_ctx_train) if n_ctx > 0 else min(h.n_ctx_train, 4096)
    n_self = h.n_layer - lib.mllama_model_cross_layers(model_ptr, ffi.NULL, 0)
    value_bytes = T.by_id(lib.mllama_model_cache_type(model_ptr, kv_f32)).type_size  # (the type the context takes)
    per_seq = n_self * 2 * n_ctx * h.n_head_kv * h.n_embd_head * value_bytes
    return max(1, min(most, free_memory() // 4 // max(per_seq, 1)))


def free_memory() -> int:
    """Host memory free now, in bytes; where the OS does not say (macOS has no SC_AVPHYS_PAGES: its sysconf raises
    ValueError), half the physical memory; 0 where neither is known."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return 0


def check_sizes(**sizes) -> None:
    """ValueError for a size that is not a whole number >= 0 (0 and None: the default; n_seq_max may be "auto")."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name} must be a whole number >= 0 (0 or None: the default), not {value!r}")
        if value is not None and value >= 2**31:  # (the C ABI's int32: cffi's OverflowError named no argument)
            raise ValueError(f"{name} {value} is out of range (at most {2**31 - 1})")


def kernel_switch(value):
    """cpu_kernels as the C side reads it: None (the environment's, else all), a string ("1" all, "0" none, or
    names), or 0/1/True/False (0 had been read as no value: every kernel on)."""
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return str(int(value))
    if value is not None and not isinstance(value, str):
        raise TypeError(f"cpu_kernels must be a string of kernel names, \"1\" (all) or \"0\" (none), "
                        f"not {type(value).__name__}")
    return value


def check_outputs(profile, dump_dir, sources: dict[str, str]) -> None:
    """ValueError naming where a value came from (`sources`: option -> "profile", or MLLAMA_PROFILE when the
    environment gave it) for a profile path that is a folder or whose folder is missing (nothing was written, and
    nothing said so), or a dump folder that cannot be made; makes the dump folder."""
    if profile and (Path(profile).is_dir() or not Path(profile).parent.is_dir()):
        raise ValueError(f"{sources['profile']}: {profile} must name a file in an existing folder")
    if profile and dump_dir:  # (the dumps took ggml's per-node callback: the profile was silently not written)
        raise ValueError(f"{sources['profile']} and {sources['dump_dir']} cannot both be set: one at a time")
    if profile:
        try:  # written when the model closes: a file it cannot write is said now (it had been silently skipped)
            with open(profile, "a"):
                pass
        except OSError as exc:
            raise ValueError(f"{sources['profile']}: cannot write {profile}: {exc.strerror or exc}") from None
    if dump_dir:
        try:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{sources['dump_dir']}: cannot make the folder {dump_dir}: {exc.strerror or exc}") from None


def new_context(model_ptr, values: dict, *, dump_dir, dump_filter, cpu_kernels, profile) -> tuple:
    """A context for the model; returns it and its effective (resolved) sizes."""
    strings = CStrings()
    params = ffi.new("mllama_context_params *", lib.mllama_context_default_params())
    for key, value in values.items():
        setattr(params, key, int(value))
    params.dump_dir, params.dump_filter = strings(dump_dir), strings(dump_filter)
    params.cpu_kernels, params.profile_path = strings(cpu_kernels), strings(profile)
    out = ffi.new("mllama_context **")
    call(lib.mllama_context_init, model_ptr, params, out, error=ModelLoadError)
    effective = ffi.new("mllama_context_params *")
    call(lib.mllama_context_get_params, out[0], effective)
    return out[0], {"n_ctx": int(effective.n_ctx), "n_batch": int(effective.n_batch),
                    "n_image_slots": int(effective.n_image_slots), "n_seq_max": int(effective.n_seq_max)}
