"""The public model object. This part holds loading, hyperparameters and weight access; the
generation API builds on it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dtypes as T
from ._lib import Handle, ModelLoadError, call, cstr, ffi, lib, log_level_for, logger



@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the fastest dimension
    nbytes: int
    buffer: str


def _struct_to_dict(cdata) -> dict:
    out = {}
    for name, field in ffi.typeof(cdata).item.fields if ffi.typeof(cdata).kind == "pointer" else ffi.typeof(cdata).fields:
        value = getattr(cdata, name)
        if field.type.kind == "array":
            value = [float(x) for x in value] if field.type.item.cname == "float" else cstr(value)
        out[name] = value
    return out


class Model(Handle):
    """A loaded mllama GGUF model (immutable weights and hyperparameters).

    Model(path, n_threads=None, device="auto", n_gpu_layers=-1, use_mmap=True, check_tensors=False)
    Use as a context manager or call close(); raises ModelLoadError with the reason on failure.
    """

    def __init__(self, path: str | os.PathLike, *, n_threads: int | None = None, device: str = "auto",
                 n_gpu_layers: int = -1, use_mmap: bool = True, check_tensors: bool = False,
                 log: logging.Logger | None = None):
        self.path = Path(path)
        self._log = log or logger
        self._log_handle = ffi.new_handle(self._log)
        self._device_str = ffi.new("char[]", (device or "auto").encode())
        params = ffi.new("mllama_model_params *", lib.mllama_model_default_params())
        params.n_threads = int(n_threads or 0)
        params.device = self._device_str
        params.n_gpu_layers = int(n_gpu_layers)
        params.use_mmap = 1 if use_mmap else 0
        params.check_tensors = 1 if check_tensors else 0
        params.log_level = log_level_for(self._log)
        params.log_callback = lib._mllama_log_trampoline
        params.log_user_data = self._log_handle
        out = ffi.new("mllama_model **")
        call(lib.mllama_model_load, os.fsencode(self.path), ffi.NULL, params, out, error=ModelLoadError)
        super().__init__(out[0], lib.mllama_model_free)

    # --- metadata ---------------------------------------------------------------------------
    @property
    def hparams(self) -> dict:
        """Hyperparameters read from the file (text, vision, special token ids)."""
        h = ffi.new("mllama_hparams *")
        call(lib.mllama_model_get_hparams, self._handle(), h)
        out = _struct_to_dict(h)
        out["cross_attention_layers"] = self._int_array(lib.mllama_model_cross_layers)
        out["intermediate_layers"] = self._int_array(lib.mllama_model_intermediate_layers)
        flat = self._int_array(lib.mllama_model_aspect_ratios)
        out["aspect_ratios"] = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return out

    @property
    def info(self) -> dict:
        """File size, parameter count, bytes of weights, device, threads, mmap."""
        info = ffi.new("mllama_model_info *")
        call(lib.mllama_model_get_info, self._handle(), info)
        return _struct_to_dict(info)

    def _int_array(self, fn) -> list[int]:
        n = fn(self._handle(), ffi.NULL, 0)
        buf = ffi.new("int32_t[]", max(1, n))
        fn(self._handle(), buf, n)
        return [int(buf[i]) for i in range(n)]

    # --- weights ----------------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        info = ffi.new("mllama_tensor_info *")
        out = []
        for i in range(lib.mllama_model_tensor_count(self._handle())):
            call(lib.mllama_model_tensor_get_info, self._handle(), i, info)
            shape = tuple(int(info.ne[d]) for d in range(max(1, info.n_dims)))
            out.append(TensorInfo(cstr(info.name), T.by_id(info.type).name, shape, int(info.n_bytes), cstr(info.buffer)))
        return out

    def read_tensor(self, name: str) -> np.ndarray:
        """A weight as float32 (dequantized), in NumPy order (the reverse of ggml's ne)."""
        info = {t.name: t for t in self.tensors()}.get(name)
        if info is None:
            raise KeyError(name)
        out = np.empty(int(np.prod(info.shape)), dtype=np.float32)
        call(lib.mllama_model_tensor_read_f32, self._handle(), name.encode(), ffi.from_buffer("float[]", out), out.size)
        return out.reshape(tuple(reversed(info.shape)))

    @property
    def image_config(self):
        """Preprocessing constants (tile size, max tiles, aspect ratios, mean/std) from the file."""
        from .preprocess import ImageConfig

        return ImageConfig.from_hparams(self.hparams)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<mllama.Model {str(self.path)!r} {state}>"


__all__ = ["Model", "TensorInfo"]
