"""The public model object: loading (a GGUF file or the local Ollama store), hyperparameters,
metadata and weight access, and the vision encoder. The generation API (GenerationMixin) builds on
it. Immutable after loading, apart from the caches of its one context, which callers share under a lock."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ._native import dtypes as T
from ._native.context_params import (CStrings, auto_sequences, check_outputs, check_sizes, kernel_switch,
                                     new_context)
from ._native.errors import MllamaError, ModelLoadError
from ._native.ffi import call, cstr, ffi, lib, struct_to_dict
from ._native.handle import Handle
from ._native.log import LOG_CALLBACK, log_level_for, logger
from ._native.placement import Placement, fill_params, read_placement
from ._native.slot_state import slot_state_info
from ._native.system import context_defaults
from .generation.api import GenerationMixin
from .generation.async_api import AsyncGenerationMixin
from .generation.constrain import GrammarVocabulary
from .generation.engine import Engine
from .generation.image_cache import ImageCache, for_model, model_identity
from .generation.scheduler import Scheduler
from .generation.sampling import SamplingParams
from .generation.session import Chat
from .hparams import HParams, from_struct
from .image.preprocess import ImageConfig, preprocess
from .ollama_store import display_name, resolve
from .settings import Environment, environment, parse_bytes, repack_mode
from .text.tokenizer import Tokenizer


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the fastest dimension
    nbytes: int
    buffer: str


def _resolve(path, projector) -> tuple[Path, Path | None, Path | None]:
    """A GGUF path, or "ollama:NAME[:TAG]" from the local Ollama store: (model, projector, the store's manifest)."""
    text = os.fspath(path)
    if not text:
        raise ModelLoadError("no model path given (an empty path)")
    if isinstance(text, str) and text.startswith("ollama:"):
        model, found, manifest = resolve(text[len("ollama:"):])
        return model, Path(projector) if projector else found, manifest
    return Path(path), Path(projector) if projector else None, None


class Model(Handle, GenerationMixin, AsyncGenerationMixin):
    """A loaded mllama GGUF model (immutable weights and hyperparameters).

    `path` is a GGUF file or "ollama:llama3.2-vision[:TAG]" (the local Ollama store, read-only);
    Ollama's older split files take the projector as `projector=`. Context sizes left as None take
    the C library's defaults (n_ctx: min(trained context, 4096) per sequence; n_batch 512; 4 image slots;
    n_seq_max 1: sequences generated at once, each with its own n_ctx cache, batched in every decode; "auto":
    up to 4, as many as a quarter of the free memory holds).
    repack, cpu_kernels, profile, dump_dir and dump_filter left as None come from the environment
    (mllama.settings: MLLAMA_REPACK, MLLAMA_CPU_KERNELS, MLLAMA_PROFILE, MLLAMA_DUMP_DIR, MLLAMA_DUMP_FILTER);
    repack="amx" puts the quantized text matrices in ggml's AMX layout where it can (settings.repack_mode).
    Encoded images are cached by content (mllama.generation.image_cache): in memory up to
    `image_cache_bytes` (an int or a string such as "512M"; 0: off; default: max(n_image_slots, 4) x the
    largest image's slot blob) and, with `image_cache_dir`, in that directory for other processes
    ("": off); None takes MLLAMA_IMAGE_CACHE_BYTES / MLLAMA_IMAGE_CACHE_DIR. Several devices: `rpc` lists ggml RPC
    workers ("host:port", `mllama rpc-server`; None takes MLLAMA_RPC), `devices` the devices the text layers are
    split over in order (default: local GPUs, then the workers' devices), `tensor_split` their shares (default:
    their free memory); `device` places the vision tower ("auto": the first local GPU, else the CPU; "cpu": everything
    on the CPU; None takes MLLAMA_DEVICE, else "auto"); `placement` says where everything went and why;
    `rpc_timeout` (s, default 10) bounds connecting to a worker, `rpc_io_timeout` (s, default 600) one answer of it.
    Use as a context manager or call close(); raises ModelLoadError with the reason on failure.
    Threads may share a Model: their generations queue in its batch scheduler and, with n_seq_max > 1, run together.
    """

    def __init__(self, path: str | os.PathLike, *, projector: str | os.PathLike | None = None,
                 n_ctx: int | None = None, n_batch: int | None = None, n_threads: int | None = None,
                 device: str | None = None, n_gpu_layers: int = -1, use_mmap: bool = True, check_tensors: bool = False,
                 n_image_slots: int | None = None, n_seq_max: int | str | None = None,
                 cross_kv_f32: bool | None = None,
                 kv_f32: bool | None = None,
                 repack: bool | str | None = None, cpu_kernels: str | None = None, profile: str | os.PathLike | None = None,
                 dump_dir: str | os.PathLike | None = None, dump_filter: str | None = None,
                 image_cache_dir: str | os.PathLike | None = None, image_cache_bytes: int | str | None = None,
                 rpc: str | Sequence[str] | None = None, devices: str | Sequence[str] | None = None,
                 tensor_split: Sequence[float] | str | None = None, rpc_timeout: float | None = None,
                 rpc_io_timeout: int | None = None,
                 log: logging.Logger | None = None):
        check_sizes(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_image_slots=n_image_slots,
                     n_seq_max=None if n_seq_max == "auto" else n_seq_max)
        env = environment()
        # (ollama_manifest: the manifest the model came from; the server's /api/tags gives its digest, as Ollama does)
        self.path, self.projector, self.ollama_manifest = _resolve(path, projector)
        text = os.fspath(path)
        is_ollama = isinstance(text, str) and text.startswith("ollama:")
        self.ollama_name = display_name(text[len("ollama:"):]) if is_ollama else None
        self._log = log or logger
        self._log_handle = ffi.new_handle(self._log)
        strings = CStrings()
        params = ffi.new("mllama_model_params *", lib.mllama_model_default_params())
        params.n_threads = int(n_threads or 0)
        params.device = strings(device or env.device or "auto")
        if not -2**31 <= n_gpu_layers < 2**31:  # (cffi's OverflowError named no argument)
            raise ValueError(f"n_gpu_layers {n_gpu_layers!r} is out of range")
        params.n_gpu_layers = int(n_gpu_layers)
        params.use_mmap = 1 if use_mmap else 0
        params.check_tensors = 1 if check_tensors else 0
        params.repack = env.repack if repack is None else repack_mode(repack)
        params.log_level = log_level_for(self._log)
        params.log_callback = LOG_CALLBACK
        params.log_user_data = self._log_handle
        keep = fill_params(params, strings, rpc=env.rpc if rpc is None else rpc, devices=devices,
                           tensor_split=tensor_split, rpc_timeout=rpc_timeout, rpc_io_timeout=rpc_io_timeout,
                           rpc_source="MLLAMA_RPC" if rpc is None else "rpc")  # noqa: F841 (alive over the call)
        out = ffi.new("mllama_model **")
        try:
            call(lib.mllama_model_load, os.fsencode(self.path), strings(self.projector), params, out, error=ModelLoadError)
        except ModelLoadError as exc:
            if device is None and env.device and "unknown device" in str(exc):  # say where the name came from
                raise ModelLoadError(f"MLLAMA_DEVICE: {exc}", exc.status) from exc
            raise
        model_ptr = out[0]
        defaults = context_defaults()
        outputs = {"dump_dir": dump_dir, "dump_filter": dump_filter, "cpu_kernels": kernel_switch(cpu_kernels),
                   "profile": profile}
        sources = {k: k if v is not None else f"MLLAMA_{k.upper()}" for k, v in outputs.items()}
        outputs = {k: getattr(env, k) if v is None else v for k, v in outputs.items()}
        try:
            check_outputs(outputs["profile"], outputs["dump_dir"], sources)
            kv = -1 if kv_f32 is None else int(bool(kv_f32))
            ctx_ptr, effective = new_context(model_ptr, dict(
                n_ctx=n_ctx or defaults["n_ctx"], n_batch=n_batch or defaults["n_batch"], n_threads=n_threads or 0,
                n_image_slots=defaults["n_image_slots"] if n_image_slots is None else n_image_slots,
                n_seq_max=auto_sequences(model_ptr, n_ctx or defaults["n_ctx"], kv) if n_seq_max == "auto" else
                n_seq_max or 1,
                cross_kv_f32=-1 if cross_kv_f32 is None else int(bool(cross_kv_f32)), kv_f32=kv), **outputs)
        except ModelLoadError as exc:  # a value from the environment: say which variable
            lib.mllama_model_free(model_ptr)
            named = [sources[k] for k, says in (("cpu_kernels", "cpu_kernels"), ("dump_filter", "dump filter"))
                     if says in str(exc) and sources[k].startswith("MLLAMA_")]
            raise (ModelLoadError(f"{named[0]}: {exc}", exc.status) if named else exc) from None
        except BaseException:
            lib.mllama_model_free(model_ptr)
            raise

        schedulers: list[Scheduler] = []  # the one made below: its worker thread stops with the model

        def free() -> None:
            for scheduler in schedulers:
                scheduler.close()
                scheduler.engine.detach()  # (one kept past close() raises, never reaches freed memory)
            lib.mllama_context_free(ctx_ptr)
            lib.mllama_model_free(model_ptr)

        super().__init__(model_ptr, free)
        self._ctx = ctx_ptr
        self._n_slots = effective["n_image_slots"]
        self._next_slot = 0
        self.n_ctx, self.n_seq_max = effective["n_ctx"], effective["n_seq_max"]  # n_ctx: per sequence
        self.n_image_slots = self._n_slots  # images one prompt may hold
        self._hparams = self._read_hparams()
        self._engine = Engine(ctx_ptr, self._hparams, self.n_ctx, effective["n_batch"], self._n_slots, self.n_seq_max)
        self._scheduler = Scheduler(self._engine, self.eog_ids)
        schedulers.append(self._scheduler)
        try:
            self._engine.image_cache = self._new_image_cache(env, image_cache_dir, image_cache_bytes)
        except BaseException:
            self.close()
            raise

    def _stepping_here(self) -> bool:  # (under the lock: a step holds it, so one running is this thread's)
        scheduler = getattr(self, "_scheduler", None)
        return scheduler is not None and scheduler.stepping

    @property
    def placement(self) -> list[Placement]:
        """Where the vision tower, the token embedding, each run of text layers and the output went, and why."""
        with self.using() as handle:
            return read_placement(handle)

    @property
    def scheduler(self) -> Scheduler:
        """The batch scheduler: requests waiting and running on this model's sequences (step it under
        the model's lock: run_step)."""
        self._handle()
        return self._scheduler

    @property
    def engine(self) -> Engine:
        """The sequence engine over this model's context (what its caches hold; evaluate and step).
        For benchmarks and tests that time or probe single stages: it is not locked, so callers
        must not share the model with other threads while they use it."""
        self._handle()
        return self._engine

    @property
    def image_cache(self) -> ImageCache | None:
        """The cache of encoded images (stats, budget, directory); None when off."""
        return self._engine.image_cache

    def _new_image_cache(self, env: Environment, directory, max_bytes) -> ImageCache | None:
        directory = env.image_cache_dir if directory is None else directory
        max_bytes = env.image_cache_bytes if max_bytes is None else parse_bytes(max_bytes, "image_cache_bytes")
        if self._n_slots <= 0:
            return None
        try:
            info = slot_state_info(self._ctx)
        except MllamaError:  # a model without cross-attention layers: nothing to cache
            return None
        paths = [p for p in (self.path, self.projector) if p is not None]
        identity = model_identity(paths, self._hparams, info, self.op_paths())
        try:
            return for_model(info, identity=identity, n_slots=self._n_slots, max_bytes=max_bytes,
                             directory=directory or None)
        except ValueError as exc:  # the directory came from the environment: say which variable
            raise ValueError(f"MLLAMA_IMAGE_CACHE_DIR: {exc}") if env.image_cache_dir and directory == \
                env.image_cache_dir else exc from None

    # --- metadata ---------------------------------------------------------------------------
    @property
    def hparams(self) -> HParams:
        """Hyperparameters read from the file (text, vision, special token ids); read once at load."""
        self._handle()
        return self._hparams

    def _read_hparams(self) -> HParams:
        h = ffi.new("mllama_hparams *")
        with self.using() as handle:
            call(lib.mllama_model_get_hparams, handle, h)
        flat = self._int_array(lib.mllama_model_aspect_ratios)
        return from_struct(h, {"cross_attention_layers": self._int_array(lib.mllama_model_cross_layers),
                               "intermediate_layers": self._int_array(lib.mllama_model_intermediate_layers),
                               "aspect_ratios": [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]})

    @property
    def info(self) -> dict:
        """File size, parameter count, bytes of weights, device, threads, mmap."""
        info = ffi.new("mllama_model_info *")
        with self.using() as handle:
            call(lib.mllama_model_get_info, handle, info)
        return struct_to_dict(info)

    def _int_array(self, fn) -> list[int]:
        with self.using() as handle:
            n = fn(handle, ffi.NULL, 0)
            buf = ffi.new("int32_t[]", max(1, n))
            fn(handle, buf, n)
        return [int(buf[i]) for i in range(n)]

    # --- weights ----------------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        info = ffi.new("mllama_tensor_info *")
        out = []
        with self.using() as handle:
            for i in range(lib.mllama_model_tensor_count(handle)):
                call(lib.mllama_model_tensor_get_info, handle, i, info)
                shape = tuple(int(info.ne[d]) for d in range(max(1, info.n_dims)))
                out.append(TensorInfo(cstr(info.name), T.by_id(info.type).name, shape, int(info.n_bytes),
                                      cstr(info.buffer)))
        return out

    def read_tensor(self, name: str) -> np.ndarray:
        """A weight as float32 (dequantized), in NumPy order (the reverse of ggml's ne)."""
        info = {t.name: t for t in self.tensors()}.get(name)
        if info is None:
            raise KeyError(name)
        out = np.empty(int(np.prod(info.shape)), dtype=np.float32)
        with self.using() as handle:
            call(lib.mllama_model_tensor_read_f32, handle, name.encode(), ffi.from_buffer("float[]", out), out.size)
        return out.reshape(tuple(reversed(info.shape)))

    # --- images -----------------------------------------------------------------------------
    def encode_image(self, image, *, slot: int | None = None) -> np.ndarray:
        """Run the vision encoder on one image and keep its cross-attention K/V in an image slot
        (`slot`, or the next one in turn that no running generation reads). Returns the vision output
        (max_tiles, n_positions, v_output_dim) float32, in the reference channel order."""
        pre = preprocess(image, self.image_config)
        return self.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=slot)

    def encode_pixels(self, pixel_values: np.ndarray, aspect_ratio_id: int, n_tiles: int, *,
                      slot: int | None = None) -> np.ndarray:
        """encode_image for already preprocessed pixels (max_tiles, channels, tile, tile)."""
        hp = self.hparams
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        out = np.empty((hp.v_max_tiles, hp.v_n_positions, hp.v_output_dim), dtype=np.float32)
        with self._lock:
            ctx = self._handle() and self._ctx
            self._scheduler.reap()
            if slot is None:
                slot = self._free_slot_in_turn()
            if 0 <= slot < len(self._engine.slot_keys):
                if self._engine.slot_refs[slot]:
                    raise MllamaError(f"image slot {slot} is read by a running generation: choose another slot")
                self._engine.slot_keys[slot] = None  # the slot no longer holds what the engine put there
            call(lib.mllama_context_encode_image, ctx, slot, ffi.from_buffer("float[]", pixels), pixels.size,
                 int(aspect_ratio_id), int(n_tiles), ffi.from_buffer("float[]", out), out.size)
        return out

    def _free_slot_in_turn(self) -> int:
        """The next image slot in turn that no running generation reads (under the lock)."""
        n = max(1, self._n_slots)
        refs = self._engine.slot_refs
        for slot in ((self._next_slot + i) % n for i in range(n)):
            if slot >= len(refs) or not refs[slot]:
                self._next_slot = (slot + 1) % n
                return slot
        raise MllamaError("every image slot is read by a running generation: wait for one, or name a slot")

    def cross_kv(self, slot: int, cross_index: int) -> tuple[np.ndarray, np.ndarray]:
        """K (after k_norm) and V of one cross-attention layer held in `slot`:
        each (max_tiles * n_positions, n_head_kv, head_dim)."""
        hp = self.hparams
        shape = (hp.v_max_tiles * hp.v_n_positions, hp.n_head_kv, hp.n_embd_head)
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        with self._lock:
            call(lib.mllama_context_read_cross_kv, self._handle() and self._ctx, slot, cross_index,
                 ffi.from_buffer("float[]", k), ffi.from_buffer("float[]", v), k.size)
        return k, v

    def op_paths(self) -> dict[str, str]:
        """Which path each op family takes here: mllama's CPU kernels, ggml's CPU ops (and their SIMD),
        or the compute device (family -> path)."""
        n = ffi.new("uint64_t *")
        with self._lock:
            call(lib.mllama_context_op_paths, self._handle() and self._ctx, ffi.NULL, 0, n)
            buf = ffi.new("char[]", n[0] + 1)
            call(lib.mllama_context_op_paths, self._ctx, buf, n[0] + 1, n)
        lines = ffi.string(buf, n[0]).decode().splitlines()
        return dict(line.split(": ", 1) for line in lines)

    @cached_property
    def image_config(self) -> ImageConfig:
        """Preprocessing constants (tile size, max tiles, aspect ratios, mean/std) from the file."""
        return ImageConfig.from_hparams(self.hparams)

    # --- metadata by GGUF key ---------------------------------------------------------------
    def meta_string(self, key: str) -> str | None:
        """A string metadata value of the file (None when absent or not a string)."""
        n = ffi.new("uint64_t *")
        with self.using() as handle:
            if lib.mllama_model_meta_string(handle, key.encode(), ffi.NULL, 0, n) != lib.MLLAMA_OK:
                return None
            buf = ffi.new("char[]", n[0] + 1)
            call(lib.mllama_model_meta_string, handle, key.encode(), buf, n[0] + 1, n)
        return ffi.string(buf, n[0]).decode("utf-8", "replace")

    def meta_number(self, key: str) -> float | None:
        """A numeric (or bool) metadata value of the file, None when absent."""
        value = ffi.new("double *")
        with self.using() as handle:
            if lib.mllama_model_meta_number(handle, key.encode(), value) != lib.MLLAMA_OK:
                return None
        return float(value[0])

    def meta_ints(self, key: str) -> list[int]:
        """An integer-array metadata value of the file ([] when absent)."""
        with self.using() as handle:
            n = lib.mllama_model_meta_ints(handle, key.encode(), ffi.NULL, 0)
            if n <= 0:
                return []
            buf = ffi.new("int64_t[]", n)
            lib.mllama_model_meta_ints(handle, key.encode(), buf, n)
        return [int(buf[i]) for i in range(n)]

    @cached_property
    def name(self) -> str:
        """The Ollama name (NAME:TAG) of a model loaded as "ollama:NAME[:TAG]", else the file's general.name
        or its file name (read once: every streamed chunk carries it)."""
        return self.ollama_name or self.meta_string("general.name") or self.path.stem

    @cached_property
    def tokenizer(self) -> Tokenizer:
        n = ffi.new("uint64_t *")
        n_tokens = self.hparams.n_tokens
        with self.using() as handle:
            call(lib.mllama_model_vocab, handle, ffi.NULL, 0, n, ffi.NULL, 0, error=ModelLoadError)
            text = ffi.new("char[]", n[0])
            types = ffi.new("int32_t[]", max(1, n_tokens))
            call(lib.mllama_model_vocab, handle, text, n[0], n, types, n_tokens, error=ModelLoadError)
        tokens = ffi.buffer(text, n[0])[:].decode("utf-8").split("\0")[:n_tokens]
        return Tokenizer(tokens, list(types), self.meta_string("tokenizer.ggml.pre") or "llama-bpe")

    @cached_property
    def eog_ids(self) -> frozenset[int]:
        """Every end-of-generation id in the file (eos, eot, eom and the generation config's list)."""
        hp = self.hparams
        ids = set(self.meta_ints("tokenizer.ggml.eos_token_ids"))
        ids |= {i for i in (hp.eos_token_id, hp.eot_token_id, hp.eom_token_id) if i >= 0}
        return frozenset(ids)

    @cached_property
    def grammar_vocabulary(self) -> GrammarVocabulary:
        """The vocabulary as constrained decoding sees it (llguidance's tokenizer is built on first use)."""
        hp = self.hparams
        return GrammarVocabulary(self.tokenizer, self.eog_ids, hp.n_vocab, forbidden=[hp.image_token_id])

    @cached_property
    def default_sampling(self) -> SamplingParams:
        """Sampling defaults from the file's generation config (temperature 0.6, top_p 0.9 for Instruct)."""
        temperature = self.meta_number("mllama.generation.temperature")
        top_p = self.meta_number("mllama.generation.top_p")
        top_k = self.meta_number("mllama.generation.top_k")
        do_sample = self.meta_number("mllama.generation.do_sample")
        return SamplingParams().with_overrides(temperature=0.0 if do_sample == 0.0 else temperature, top_p=top_p,
                                               top_k=int(top_k) if top_k is not None else None)

    def chat_session(self, *, system: str | None = None, truncate: bool = True, **sampling) -> Chat:
        """A multi-turn Chat that reuses the caches between turns; a history that outgrows the context
        leaves out its oldest messages from the prompt (generation/context_fit.py) unless truncate=False."""
        return Chat(self, system=system, truncate=truncate, **sampling)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<mllama.Model {str(self.path)!r} {state}>"


__all__ = ["Model", "TensorInfo"]
