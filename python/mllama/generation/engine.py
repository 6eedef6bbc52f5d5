"""The sequence engine: keeps track of what the context's caches hold (tokens at positions
0..n-1, images in slots 0..m-1), evaluates only what changed, and computes the cross-attention
rows of every token (as transformers 5.23.0 processing_mllama.get_cross_attention_token_mask: an
image is attended by the tokens from its own <|image|> up to the next non-adjacent <|image|>;
generated tokens attend like the last prompt token)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .._native.errors import ContextOverflowError
from .._native.ffi import call, ffi, lib
from ..hparams import HParams
from ..image.preprocess import ImageConfig, preprocess


def image_ranges(tokens: list[int], image_token: int) -> list[tuple[int, int | None]]:
    """[start, end) token range per image in order; end None = open (to the end of the sequence)."""
    locs = [i for i, t in enumerate(tokens) if t == image_token]
    ranges: list[tuple[int, int | None]] = []
    for k, loc in enumerate(locs):
        ranges.append((loc, locs[k + 1] if k + 1 < len(locs) else None))
    for k in range(len(ranges) - 2, -1, -1):  # adjacent images share the later image's end
        if locs[k + 1] == locs[k] + 1:
            ranges[k] = (ranges[k][0], ranges[k + 1][1])
    return ranges


def row_table(ranges: list[tuple[int, int | None]], first: int, n: int) -> np.ndarray:
    """uint8 (n, n_images): 1 where token first + i attends to image m."""
    rows = np.zeros((n, len(ranges)), dtype=np.uint8)
    pos = np.arange(first, first + n)
    for m, (start, end) in enumerate(ranges):
        rows[:, m] = (pos >= start) & (pos < (end if end is not None else np.iinfo(np.int64).max))
    return rows


def image_key(pixel_values: np.ndarray, aspect_ratio_id: int) -> str:
    digest = hashlib.sha1(np.ascontiguousarray(pixel_values).tobytes())
    digest.update(str(aspect_ratio_id).encode())
    return digest.hexdigest()


@dataclass
class PreparedImage:
    pixel_values: np.ndarray
    aspect_ratio_id: int
    n_tiles: int
    key: str
    source: str = ""  # what the caller passed (a path, or the kind of object), for display


def prepare_images(images: Iterable[Any], config: ImageConfig) -> list[PreparedImage]:
    """Preprocess each image once (PreparedImage inputs pass through unchanged)."""
    out = []
    for image in images:
        if isinstance(image, PreparedImage):
            out.append(image)
            continue
        pre = preprocess(image, config)
        source = str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
        out.append(PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles,
                                 image_key(pre.pixel_values, pre.aspect_ratio_id), source))
    return out


@dataclass
class SequenceState:
    tokens: list[int] = field(default_factory=list)     # evaluated tokens, positions 0..n-1
    image_keys: list[str] = field(default_factory=list)  # image held by slot m


class Engine:
    """Evaluates token sequences on one context; owned by a Model, used under its lock."""

    def __init__(self, ctx, hparams: HParams, n_ctx: int, n_batch: int, n_slots: int):
        self.ctx = ctx
        self.n_vocab = hparams.n_vocab
        self.image_token = hparams.image_token_id
        self.n_ctx, self.n_batch, self.n_slots = n_ctx, n_batch, n_slots
        self.state = SequenceState()
        self.slot_keys: list[str | None] = [None] * n_slots

    def encode(self, slot: int, image: PreparedImage) -> None:
        """Run the vision encoder on a prepared image into `slot` (its cross-attention K/V)."""
        pixels = np.ascontiguousarray(image.pixel_values, dtype=np.float32)
        call(lib.mllama_context_encode_image, self.ctx, slot, ffi.from_buffer("float[]", pixels), pixels.size,
             image.aspect_ratio_id, image.n_tiles, ffi.NULL, 0)
        self.slot_keys[slot] = image.key

    def _place_images(self, images: list[PreparedImage], tokens: list[int]) -> int:
        """Encode images whose slot holds something else; returns how many cached tokens stay valid."""
        if len(images) > self.n_slots:
            raise ContextOverflowError(f"{len(images)} images exceed the {self.n_slots} image slots (n_image_slots)")
        locs = [i for i, t in enumerate(tokens) if t == self.image_token]
        if len(locs) != len(images):
            raise ValueError(f"the prompt has {len(locs)} <|image|> tokens but {len(images)} images were given")
        valid = len(self.state.tokens)
        for m, image in enumerate(images):
            if self.slot_keys[m] != image.key:
                self.encode(m, image)
                valid = min(valid, locs[m])  # tokens from this image's token on saw another image
        self.state.image_keys = [im.key for im in images]
        return valid

    def evaluate(self, tokens: list[int], images: list[PreparedImage], all_logits: bool = False) -> np.ndarray:
        """Bring the caches to `tokens`; logits of the last token (or of every token)."""
        if not tokens:
            raise ValueError("cannot evaluate an empty prompt")
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx} (n_ctx)")
        valid = self._place_images(images, tokens)
        n_past = 0
        if not all_logits:
            limit = min(valid, len(tokens) - 1)
            while n_past < limit and self.state.tokens[n_past] == tokens[n_past]:
                n_past += 1
        self.state.tokens = list(tokens[:n_past])
        ranges = image_ranges(tokens, self.image_token)
        out = np.empty((len(tokens) - n_past if all_logits else 1, self.n_vocab), dtype=np.float32)
        for start in range(n_past, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            rows = list(range(len(chunk))) if all_logits else ([len(chunk) - 1] if last else [])
            dst = out[start - n_past:start - n_past + len(chunk)] if all_logits else out
            self._decode(chunk, start, len(images), row_table(ranges, start, len(chunk)), rows, dst)
            self.state.tokens.extend(chunk)
        return out if all_logits else out[0]

    def step(self, token: int, n_images: int) -> np.ndarray:
        """Evaluate one generated token (it attends like the last prompt token)."""
        if len(self.state.tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the context is full ({self.n_ctx} tokens)")
        ranges = image_ranges(self.state.tokens + [token], self.image_token)
        out = np.empty((1, self.n_vocab), dtype=np.float32)
        self._decode([token], len(self.state.tokens), n_images, row_table(ranges, len(self.state.tokens), 1), [0], out)
        self.state.tokens.append(token)
        return out[0]

    def _decode(self, tokens: list[int], n_past: int, n_images: int, rows_images: np.ndarray, out_rows: list[int],
                out: np.ndarray) -> None:
        toks = np.asarray(tokens, dtype=np.int32)
        table = np.ascontiguousarray(rows_images, dtype=np.uint8)
        rows = np.asarray(out_rows, dtype=np.int32)
        try:
            call(lib.mllama_context_decode, self.ctx, ffi.from_buffer("int32_t[]", toks), len(toks), n_past, n_images,
                 ffi.from_buffer("uint8_t[]", table) if table.size else ffi.NULL,
                 ffi.from_buffer("int32_t[]", rows) if rows.size else ffi.NULL, len(rows),
                 ffi.from_buffer("float[]", out) if rows.size else ffi.NULL)
        except BaseException:
            self.state.tokens = self.state.tokens[:n_past]  # the cache past n_past is now unknown
            raise

    @property
    def n_decoded(self) -> int:
        return int(lib.mllama_context_n_decoded(self.ctx))

    def memory(self) -> dict:
        out = ffi.new("mllama_context_memory *")
        call(lib.mllama_context_get_memory, self.ctx, out)
        return {"kv_cache": int(out.kv_cache), "image_slots": int(out.image_slots), "compute": int(out.compute)}
