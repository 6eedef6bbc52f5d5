"""The public model object. This part holds loading, hyperparameters and weight access; the
generation API builds on it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import dtypes as T
from ._lib import Handle, ModelLoadError, call, cstr, ffi, lib, log_level_for, logger
from .generation import GenerationMixin



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


def _resolve(path, projector) -> tuple[Path, Path | None]:
    """A GGUF path, or "ollama:NAME[:TAG]" from the local Ollama store."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith("ollama:"):
        from .ollama import resolve

        model, found = resolve(text[len("ollama:"):])
        return model, Path(projector) if projector else found
    return Path(path), Path(projector) if projector else None


class Model(Handle, GenerationMixin):
    """A loaded mllama GGUF model (immutable weights and hyperparameters).

    `path` is a GGUF file or "ollama:llama3.2-vision[:TAG]" (the local Ollama store, read-only);
    Ollama's older split files take the projector as `projector=`.
    Model(path, n_ctx=None, n_batch=512, n_threads=None, device="auto", n_gpu_layers=-1, use_mmap=True,
          n_image_slots=4, dump_dir=None, dump_filter=None)
    Use as a context manager or call close(); raises ModelLoadError with the reason on failure.
    One Model serializes its callers: calls from several threads wait for each other.
    """

    def __init__(self, path: str | os.PathLike, *, projector: str | os.PathLike | None = None,
                 n_ctx: int | None = None, n_batch: int = 512,
                 n_threads: int | None = None, device: str = "auto",
                 n_gpu_layers: int = -1, use_mmap: bool = True, check_tensors: bool = False,
                 n_image_slots: int = 4, cross_kv_f32: bool | None = None, kv_f32: bool | None = None,
                 dump_dir: str | os.PathLike | None = None, dump_filter: str | None = None,
                 log: logging.Logger | None = None):
        path, projector = _resolve(path, projector)
        self.path, self.projector = path, projector
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
        params.repack = 0 if os.environ.get("MLLAMA_REPACK") == "0" else 1
        out = ffi.new("mllama_model **")
        call(lib.mllama_model_load, os.fsencode(self.path), os.fsencode(projector) if projector else ffi.NULL, params, out,
             error=ModelLoadError)
        model_ptr = out[0]
        try:
            ctx_ptr, ctx_params = self._new_context(model_ptr, dict(
                n_ctx=int(n_ctx or 0), n_batch=int(n_batch), n_threads=int(n_threads or 0), n_image_slots=int(n_image_slots),
                cross_kv_f32=-1 if cross_kv_f32 is None else int(bool(cross_kv_f32)),
                kv_f32=-1 if kv_f32 is None else int(bool(kv_f32))), dump_dir, dump_filter)
        except BaseException:
            lib.mllama_model_free(model_ptr)
            raise

        def free() -> None:
            lib.mllama_context_free(ctx_ptr)
            lib.mllama_model_free(model_ptr)

        super().__init__(model_ptr, free)
        self._ctx = ctx_ptr
        self._n_slots = n_image_slots
        self._next_slot = 0
        self.last_image_slot: int | None = None
        self.last_finish_reason: str | None = None
        self._generating = False
        self.last_usage = {"prompt_tokens": 0, "completion_tokens": 0}
        from .engine import Engine

        self.hparams_cached = self.hparams
        self._engine = Engine(ctx_ptr, self.hparams_cached, ctx_params["n_ctx"], ctx_params["n_batch"], n_image_slots)
        self.n_ctx = ctx_params["n_ctx"]

    @staticmethod
    def _new_context(model_ptr, values: dict, dump_dir, dump_filter):
        params = ffi.new("mllama_context_params *", lib.mllama_context_default_params())
        for key, value in values.items():
            setattr(params, key, value)
        dump_dir = dump_dir if dump_dir is not None else os.environ.get("MLLAMA_DUMP_DIR")
        dump_filter = dump_filter if dump_filter is not None else os.environ.get("MLLAMA_DUMP_FILTER")
        keep = []
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            keep.append(ffi.new("char[]", os.fsencode(dump_dir)))
            params.dump_dir = keep[-1]
        if dump_filter:
            keep.append(ffi.new("char[]", dump_filter.encode()))
            params.dump_filter = keep[-1]
        cpu_kernels = os.environ.get("MLLAMA_CPU_KERNELS")
        if cpu_kernels is not None:
            keep.append(ffi.new("char[]", cpu_kernels.encode()))
            params.cpu_kernels = keep[-1]
        profile_path = os.environ.get("MLLAMA_PROFILE")
        if profile_path:
            keep.append(ffi.new("char[]", os.fsencode(profile_path)))
            params.profile_path = keep[-1]
        out = ffi.new("mllama_context **")
        call(lib.mllama_context_init, model_ptr, params, out, error=ModelLoadError)
        effective = ffi.new("mllama_context_params *")
        call(lib.mllama_context_get_params, out[0], effective)
        return out[0], {"n_ctx": int(effective.n_ctx), "n_batch": int(effective.n_batch)}

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

    # --- images -----------------------------------------------------------------------------
    def encode_image(self, image, *, slot: int | None = None) -> np.ndarray:
        """Run the vision encoder on one image and keep its cross-attention K/V in an image slot.

        Returns the vision output (max_tiles, n_positions, v_output_dim) float32, in the reference
        channel order; the slot used is `last_image_slot`."""
        from .preprocess import preprocess

        pre = preprocess(image, self.image_config)
        return self.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=slot)

    def encode_pixels(self, pixel_values: np.ndarray, aspect_ratio_id: int, n_tiles: int, *,
                      slot: int | None = None) -> np.ndarray:
        """encode_image for already preprocessed pixels (max_tiles, channels, tile, tile)."""
        hp = self._hp
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        out = np.empty((hp["v_max_tiles"], hp["v_n_positions"], hp["v_output_dim"]), dtype=np.float32)
        with self._lock:
            ctx = self._handle() and self._ctx
            if slot is None:
                slot = self._next_slot
                self._next_slot = (self._next_slot + 1) % max(1, self._n_slots)
            if 0 <= slot < len(self._engine.slot_keys):
                self._engine.slot_keys[slot] = None  # the slot no longer holds what the engine put there
            call(lib.mllama_context_encode_image, ctx, slot, ffi.from_buffer("float[]", pixels), pixels.size,
                 int(aspect_ratio_id), int(n_tiles), ffi.from_buffer("float[]", out), out.size)
            self.last_image_slot = slot
        return out

    def cross_kv(self, slot: int, cross_index: int) -> tuple[np.ndarray, np.ndarray]:
        """K (after k_norm) and V of one cross-attention layer held in `slot`:
        each (max_tiles * n_positions, n_head_kv, head_dim)."""
        hp = self._hp
        shape = (hp["v_max_tiles"] * hp["v_n_positions"], hp["n_head_kv"], hp["n_embd_head"])
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        with self._lock:
            call(lib.mllama_context_read_cross_kv, self._handle() and self._ctx, slot, cross_index,
                 ffi.from_buffer("float[]", k), ffi.from_buffer("float[]", v), k.size)
        return k, v

    @property
    def _hp(self) -> dict:
        return self.hparams_cached

    # --- metadata used by generation --------------------------------------------------------
    def _meta_string(self, key: str) -> str | None:
        n = ffi.new("uint64_t *")
        if lib.mllama_model_meta_string(self._handle(), key.encode(), ffi.NULL, 0, n) != lib.MLLAMA_OK:
            return None
        buf = ffi.new("char[]", n[0] + 1)
        call(lib.mllama_model_meta_string, self._handle(), key.encode(), buf, n[0] + 1, n)
        return ffi.string(buf, n[0]).decode("utf-8", "replace")

    def _meta_number(self, key: str) -> float | None:
        value = ffi.new("double *")
        if lib.mllama_model_meta_number(self._handle(), key.encode(), value) != lib.MLLAMA_OK:
            return None
        return float(value[0])

    def _meta_ints(self, key: str) -> list[int]:
        n = lib.mllama_model_meta_ints(self._handle(), key.encode(), ffi.NULL, 0)
        if n <= 0:
            return []
        buf = ffi.new("int64_t[]", n)
        lib.mllama_model_meta_ints(self._handle(), key.encode(), buf, n)
        return [int(buf[i]) for i in range(n)]

    @property
    def name(self) -> str:
        return self._meta_string("general.name") or self.path.stem

    @cached_property
    def tokenizer(self):
        from .tokenizer import Tokenizer

        n = ffi.new("uint64_t *")
        call(lib.mllama_model_vocab, self._handle(), ffi.NULL, 0, n, ffi.NULL, 0, error=ModelLoadError)
        text = ffi.new("char[]", n[0])
        n_tokens = self.hparams_cached["n_tokens"]
        types = ffi.new("int32_t[]", max(1, n_tokens))
        call(lib.mllama_model_vocab, self._handle(), text, n[0], n, types, n_tokens, error=ModelLoadError)
        tokens = ffi.buffer(text, n[0])[:].decode("utf-8").split("\0")[:n_tokens]
        return Tokenizer(tokens, list(types), self._meta_string("tokenizer.ggml.pre") or "llama-bpe")

    @cached_property
    def eog_ids(self) -> frozenset[int]:
        """Every end-of-generation id in the file (eos, eot, eom and the generation config's list)."""
        hp = self.hparams_cached
        ids = set(self._meta_ints("tokenizer.ggml.eos_token_ids"))
        ids |= {hp[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if hp[k] >= 0}
        return frozenset(ids)

    @cached_property
    def default_sampling(self):
        """Sampling defaults from the file's generation config (temperature 0.6, top_p 0.9 for Instruct)."""
        from .sampling import SamplingParams

        p = SamplingParams()
        temperature = self._meta_number("mllama.generation.temperature")
        top_p = self._meta_number("mllama.generation.top_p")
        top_k = self._meta_number("mllama.generation.top_k")
        do_sample = self._meta_number("mllama.generation.do_sample")
        return p.with_overrides(temperature=0.0 if do_sample == 0.0 else temperature, top_p=top_p,
                                top_k=int(top_k) if top_k is not None else None)

    def chat_session(self, *, system: str | None = None, **sampling):
        """A multi-turn Chat that reuses the caches between turns."""
        from .session import Chat

        return Chat(self, system=system, **sampling)

    @property
    def image_config(self):
        """Preprocessing constants (tile size, max tiles, aspect ratios, mean/std) from the file."""
        from .preprocess import ImageConfig

        return ImageConfig.from_hparams(self.hparams)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<mllama.Model {str(self.path)!r} {state}>"


__all__ = ["Model", "TensorInfo"]
