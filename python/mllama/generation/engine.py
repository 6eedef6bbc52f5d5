"""The sequence engine: keeps track of what the context's caches hold (each sequence's tokens at
positions 0..n-1, the images of a pool of slots shared by content), evaluates only what changed,
batches several sequences in one decode, and computes the cross-attention
rows of every token (as transformers 5.23.0 processing_mllama.get_cross_attention_token_mask: an
image is attended by the tokens from its own <|image|> up to the next non-adjacent <|image|>;
generated tokens attend like the last prompt token)."""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .._native.errors import ContextOverflowError, MllamaError, ModelClosedError
from .._native.ffi import call, ffi, lib
from ..hparams import HParams
from .image_cache import ImageCache
from ..image.preprocess import ImageConfig, preprocess


def image_locations(tokens: Iterable[int], image_token: int, first: int = 0) -> list[int]:
    """The positions of the <|image|> tokens (the first token at position `first`)."""
    return [first + i for i, t in enumerate(tokens) if t == image_token]


def ranges_of(locs: list[int]) -> list[tuple[int, int | None]]:
    """[start, end) token range per image in order (end None = open, to the end of the sequence), given the positions
    of the <|image|> tokens."""
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
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray, PreparedImage)) or \
            hasattr(images, "getpixel"):  # (one image, a PIL one among them: its pixels, or a path's letters)
        raise TypeError(f"images must be a list of images, not one {type(images).__name__}: pass [image]")
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


class SequenceState:
    """What one sequence's cache holds: its evaluated tokens (positions 0..n-1), its images in prompt order and the
    slot holding each while it runs. The positions of its <|image|> tokens are kept as the tokens change (keep,
    extend; assigning `tokens` recounts them), so that a decode step's bookkeeping does not grow with the
    sequence's length (it had scanned and copied every token of it: 9 ms a step at 128K tokens)."""

    def __init__(self, image_token: int, tokens: Iterable[int] = (), image_keys: Iterable[str] = (),
                 slots: Iterable[int] = ()):
        self.image_token = image_token
        self.image_keys, self.slots = list(image_keys), list(slots)
        self.tokens = list(tokens)

    @property
    def tokens(self) -> list[int]:
        """The evaluated tokens (change them through keep, extend or assignment, never in place)."""
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: Iterable[int]) -> None:
        self._tokens = list(tokens)
        self.image_locs = image_locations(self._tokens, self.image_token)

    def keep(self, n: int) -> None:
        """Forget the tokens from position n on."""
        del self._tokens[n:]
        del self.image_locs[bisect.bisect_left(self.image_locs, n):]

    def extend(self, tokens: Iterable[int]) -> None:
        tokens = list(tokens)
        self.image_locs += image_locations(tokens, self.image_token, len(self._tokens))
        self._tokens += tokens

    def rows_for(self, tokens: list[int]) -> np.ndarray:
        """The row/image table of `tokens` appended to the sequence: a column per image slot of the sequence, those
        of images whose <|image|> token is still to come all zeros (a prompt chunk before its images)."""
        n_past = len(self._tokens)
        ranges = ranges_of(self.image_locs + image_locations(tokens, self.image_token, n_past))
        table = np.zeros((len(tokens), len(self.slots)), dtype=np.uint8)
        rows = row_table(ranges, n_past, len(tokens))[:, :len(self.slots)]
        table[:, :rows.shape[1]] = rows
        return table


@dataclass
class Part:
    """One sequence's tokens in a decode batch; `outputs`: rows (within the part) whose logits are wanted."""
    seq: int
    tokens: list[int]
    n_past: int
    slots: list[int]
    rows_images: np.ndarray  # uint8 (len(tokens), len(slots))
    outputs: list[int]


class Engine:
    """Evaluates the token sequences of one context (n_seq sequences, a pool of image slots shared by
    content); owned by a Model, used under its lock. Single-sequence callers use sequence 0."""

    image_cache: ImageCache | None = None  # set by the Model: vision results by image content
    n_encoded = 0                          # images this engine ran through the vision tower
    encoding: tuple[int, PreparedImage] | None = None  # the encode in steps under way: (slot, image)

    @property
    def ctx(self):
        """The native context; ModelClosedError once the model is closed (an engine kept past close())."""
        if self._ctx is None:
            raise ModelClosedError("the model is closed")
        return self._ctx

    def detach(self) -> None:
        """As the model closes: later calls raise ModelClosedError instead of reaching the freed context."""
        self._ctx = None

    def __init__(self, ctx, hparams: HParams, n_ctx: int, n_batch: int, n_slots: int, n_seq: int = 1):
        self._ctx = ctx
        self.n_vocab = hparams.n_vocab
        self.image_token = hparams.image_token_id
        self.n_ctx, self.n_batch, self.n_slots, self.n_seq = n_ctx, n_batch, n_slots, n_seq
        self.seqs = [SequenceState(self.image_token) for _ in range(n_seq)]
        self.slot_keys: list[str | None] = [None] * n_slots
        self.slot_pending: list[str | None] = [None] * n_slots  # the image each slot awaits (claim_slots' pending)
        self.slot_refs = [0] * n_slots      # running requests that read each slot
        self.slot_used = [0] * n_slots      # when each slot was last claimed (least recently used goes first)
        self._tick = 0

    @property
    def state(self) -> SequenceState:
        return self.seqs[0]

    def encode(self, slot: int, image: PreparedImage) -> None:
        """Put a prepared image's cross-attention K/V into `slot`: from the image cache when it has
        them, else by running the vision encoder (and then keeping the result in the cache)."""
        if self._from_cache(slot, image):
            return
        pixels = np.ascontiguousarray(image.pixel_values, dtype=np.float32)
        call(lib.mllama_context_encode_image, self.ctx, slot, ffi.from_buffer("float[]", pixels), pixels.size,
             image.aspect_ratio_id, image.n_tiles, ffi.NULL, 0)
        self._encoded(slot, image)

    def _from_cache(self, slot: int, image: PreparedImage) -> bool:
        self.slot_keys[slot] = self.slot_pending[slot] = None
        if self.image_cache is None or not self.image_cache.load_into(self.ctx, slot, image.key):
            return False
        self.slot_keys[slot] = image.key
        return True

    def _encoded(self, slot: int, image: PreparedImage) -> None:
        self.n_encoded += 1
        if self.image_cache is not None:
            self.image_cache.store_from(self.ctx, slot, image.key)
        self.slot_keys[slot], self.slot_pending[slot] = image.key, None

    # --- an encode in steps (the scheduler runs decode batches between them) ------------------
    def begin_encode(self, slot: int, image: PreparedImage) -> int:
        """Starts putting an image into `slot` stage by stage (encode_step; one such encode at a time); returns
        the stages to run: 0 when the image cache had it (the slot holds it now)."""
        self.cancel_encode()
        if self._from_cache(slot, image):
            return 0
        pixels = np.ascontiguousarray(image.pixel_values, dtype=np.float32)
        n_stages = ffi.new("int32_t *")
        call(lib.mllama_context_encode_begin, self.ctx, slot, ffi.from_buffer("float[]", pixels), pixels.size,
             image.aspect_ratio_id, image.n_tiles, n_stages)
        self.encoding, self.slot_pending[slot] = (slot, image), image.key
        return int(n_stages[0])

    def encode_step(self, n_stages: int = 1) -> int:
        """Runs the next stages of the encode begun (n_stages <= 0: all); returns how many are left (0: the
        slot holds the image). A failure, or an interrupt, ends the encode (begin it again)."""
        if self.encoding is None:
            raise ValueError("no image encode in steps is under way (begin_encode)")
        slot, image = self.encoding
        left = ffi.new("int32_t *")
        try:
            call(lib.mllama_context_encode_step, self.ctx, n_stages, left)
        except BaseException:
            self.cancel_encode()
            raise
        if left[0] == 0:
            self.encoding = None
            self._encoded(slot, image)
        return int(left[0])

    def cancel_encode(self, slot: int | None = None) -> None:
        """Drops the encode in steps under way (slot given: only one into that slot); its slot holds no image."""
        if self.encoding is not None and (slot is None or self.encoding[0] == slot):
            lib.mllama_context_encode_cancel(self.ctx)
            self.slot_pending[self.encoding[0]] = None
            self.encoding = None

    # --- the image slot pool -------------------------------------------------------------------
    def claim_slots(self, images: list[PreparedImage],
                    pending: list[tuple[int, PreparedImage]] | None = None) -> list[int] | None:
        """A slot holding each image (encoding those no slot holds into the least recently used free
        slots), each claimed until release_slots; None when too few slots are free now. With `pending`,
        the images to encode are not encoded here but appended to it as (slot, image), their slots
        holding nothing until then (begin_encode); an image another request's pending encode is putting
        into a slot shares that slot, and is appended to `pending` too (the encode runs once: the
        scheduler drops it from every request when the slot holds it)."""
        wanted = {im.key for im in images}
        if len(images) > self.n_slots:  # the same image twice takes two of a sequence's slots (its row table's)
            raise ContextOverflowError(f"{len(images)} images exceed the {self.n_slots} image slots (n_image_slots)",
                                       limit="image_slots")
        held = {key: slot for slot, key in enumerate(self.slot_keys) if key is not None}
        awaited = {key: slot for key, slot in self.awaited().items() if key not in held} if pending is not None else {}
        missing = list(dict.fromkeys(im.key for im in images if im.key not in held and im.key not in awaited))
        kept = {held[key] for key in wanted if key in held}  # (one slot per image: its other copies may go, else
        free = sorted((s for s in range(self.n_slots) if self.slot_refs[s] == 0 and s not in kept),  # a request
                      key=lambda s: (self.slot_keys[s] is not None, self.slot_used[s]))  # could wait forever)
        if len(missing) > len(free):
            return None
        by_key = {im.key: im for im in images}
        for key in dict.fromkeys(im.key for im in images if im.key in awaited):
            pending.append((awaited[key], by_key[key]))
        for key, slot in zip(missing, free):
            self.cancel_encode(slot)  # (an encode left going into a slot no request reads would go on into the new)
            if pending is None:
                self.encode(slot, by_key[key])
            else:
                self.slot_keys[slot], self.slot_pending[slot] = None, key
                pending.append((slot, by_key[key]))
            held[key] = slot
        slots = [held.get(im.key, awaited.get(im.key)) for im in images]
        self._tick += 1
        for slot in slots:
            self.slot_refs[slot] += 1
            self.slot_used[slot] = self._tick
        return slots

    def awaited(self) -> dict[str, int]:
        """Images being put into slots for running requests (their encodes pending or under way): key -> slot; a
        request that brings one of them shares that slot and its encode (claim_slots)."""
        return {key: slot for slot, key in enumerate(self.slot_pending) if key is not None and self.slot_refs[slot]}

    def forget_images(self, keys: Iterable[str]) -> None:
        """Drop what images' K/V gave (after non-finite logits from a request that read them): their cache
        entries, the slots holding them (as far as reuse goes), the sequences' rows from them on; the next
        request with one of them encodes it again."""
        keys = set(keys)
        for slot, key in enumerate(self.slot_keys):
            if key in keys:
                self.slot_keys[slot] = None
        for state in self.seqs:
            state.image_keys = [None if key in keys else key for key in state.image_keys]
        if self.image_cache is not None:
            for key in keys:
                self.image_cache.forget(key)

    def release_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self.slot_refs[slot] -= 1

    def unclaim_slots(self, slots: list[int], keys_before: list[str | None]) -> None:
        """Undoes claim_slots for a request that did not start (slot_keys as they were before it: keys_before): its
        claims released, and each slot it emptied for an image whose encode had not begun holds again the image it
        held (the slot's K/V change only from begin_encode on)."""
        self.release_slots(slots)
        for slot in set(slots):
            if (self.slot_refs[slot] == 0 and self.slot_pending[slot] is not None and keys_before[slot] is not None
                    and (self.encoding is None or self.encoding[0] != slot)):
                self.slot_keys[slot], self.slot_pending[slot] = keys_before[slot], None

    # --- sequences -----------------------------------------------------------------------------
    def reusable(self, seq: int, tokens: list[int], images: list[PreparedImage]) -> int:
        """How many leading tokens of the prompt the sequence's cache already holds (same tokens, same
        images up to there); at most len(tokens) - 1, so that the last token gives fresh logits."""
        state, keys = self.seqs[seq], [im.key for im in images]
        limit, n, m = min(len(state.tokens), len(tokens) - 1), 0, 0
        while n < limit and state.tokens[n] == tokens[n]:
            if tokens[n] == self.image_token:
                if m >= len(state.image_keys) or m >= len(keys) or state.image_keys[m] != keys[m]:
                    break
                m += 1
            n += 1
        return n

    def start(self, seq: int, tokens: list[int], images: list[PreparedImage], slots: list[int],
              reuse: bool = True) -> int:
        """Point sequence `seq` at a new prompt; returns the tokens its cache keeps (evaluate the rest)."""
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx} (n_ctx)")
        locs = [i for i, t in enumerate(tokens) if t == self.image_token]
        if len(locs) != len(images):
            raise ValueError(f"the prompt has {len(locs)} <|image|> tokens but {len(images)} images were given")
        n_past = self.reusable(seq, tokens, images) if reuse else 0
        state = self.seqs[seq]
        state.keep(n_past)
        state.image_keys, state.slots = [im.key for im in images], list(slots)
        call(lib.mllama_context_seq_trim, self.ctx, seq, n_past)
        return n_past

    def copy_sequence(self, src: int, dst: int) -> None:
        """Sequence dst holds what src holds (a prompt evaluated once for several choices)."""
        n = len(self.seqs[src].tokens)
        call(lib.mllama_context_seq_copy, self.ctx, src, dst, n)
        s = self.seqs[src]
        self.seqs[dst] = SequenceState(self.image_token, s.tokens, s.image_keys, s.slots)

    def rows_for(self, seq: int, tokens: list[int]) -> np.ndarray:
        """The row/image table of `tokens` appended to sequence `seq` (SequenceState.rows_for)."""
        return self.seqs[seq].rows_for(tokens)

    # --- single-sequence use (forward, bench, tests) -------------------------------------------
    def evaluate(self, tokens: list[int], images: list[PreparedImage], all_logits: bool = False,
                 seq: int = 0) -> np.ndarray:
        """Bring sequence `seq` to `tokens`; logits of the last token (or of every token)."""
        if not tokens:
            raise ValueError("cannot evaluate an empty prompt")
        slots = self.claim_slots(images)
        if slots is None:
            raise MllamaError("every image slot is in use by running requests")
        try:
            n_past = self.start(seq, tokens, images, slots, reuse=not all_logits)
            out = []
            for first in range(n_past, len(tokens), self.n_batch):
                chunk = tokens[first:first + self.n_batch]
                last = first + len(chunk) == len(tokens)
                outputs = list(range(len(chunk))) if all_logits else ([len(chunk) - 1] if last else [])
                out.append(self.decode([Part(seq, chunk, first, slots, self.rows_for(seq, chunk), outputs)]))
            logits = np.concatenate(out)
            return logits if all_logits else logits[0]
        finally:
            self.release_slots(slots)

    def step(self, token: int, n_images: int, seq: int = 0) -> np.ndarray:
        """Evaluate one generated token of sequence `seq` (it attends like the last prompt token)."""
        state = self.seqs[seq]
        if len(state.tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the context is full ({self.n_ctx} tokens)")
        part = Part(seq, [token], len(state.tokens), state.slots[:n_images], self.rows_for(seq, [token]), [0])
        return self.decode([part])[0]

    def decode(self, parts: list[Part]) -> np.ndarray:
        """Evaluate a batch of sequence parts; the logits of their outputs, part after part."""
        tokens = np.asarray([t for p in parts for t in p.tokens], dtype=np.int32)
        seqs = ffi.new("mllama_batch_seq[]", len(parts))
        keep, out_rows, first = [], [], 0
        for c, p in zip(seqs, parts):
            slots = np.asarray(p.slots, dtype=np.int32)
            table = np.ascontiguousarray(p.rows_images[:, :len(p.slots)], dtype=np.uint8)
            keep += [slots, table]
            c.seq_id, c.n_past, c.n_tokens, c.n_images = p.seq, p.n_past, len(p.tokens), len(p.slots)
            c.image_slots = ffi.from_buffer("int32_t[]", slots) if slots.size else ffi.NULL
            c.row_images = ffi.from_buffer("uint8_t[]", table) if table.size else ffi.NULL
            out_rows += [first + r for r in p.outputs]
            first += len(p.tokens)
        rows = np.asarray(out_rows, dtype=np.int32)
        logits = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        done = False
        try:
            call(lib.mllama_context_decode_batch, self.ctx, ffi.from_buffer("int32_t[]", tokens), seqs, len(parts),
                 ffi.from_buffer("int32_t[]", rows) if rows.size else ffi.NULL, len(rows),
                 ffi.from_buffer("float[]", logits) if rows.size else ffi.NULL)
            done = True
        finally:
            for p in parts:
                state = self.seqs[p.seq]
                state.keep(p.n_past)
                if done:
                    state.extend(p.tokens)
                else:  # the cache past n_past is now unknown
                    lib.mllama_context_seq_trim(self.ctx, p.seq, p.n_past)
        return logits

    def undo(self, parts: list[Part]) -> None:
        """Forgets what a batch evaluated, whatever an interrupted decode got to (its tokens are evaluated again)."""
        for p in parts:
            self.seqs[p.seq].keep(p.n_past)
            lib.mllama_context_seq_trim(self.ctx, p.seq, p.n_past)

    def length(self, seq: int) -> int:
        out = ffi.new("int32_t *")
        call(lib.mllama_context_seq_length, self.ctx, seq, out)
        return int(out[0])
    @property
    def n_decoded(self) -> int:
        return int(lib.mllama_context_n_decoded(self.ctx))

    def memory(self) -> dict:
        out = ffi.new("mllama_context_memory *")
        call(lib.mllama_context_get_memory, self.ctx, out)
        return {"kv_cache": int(out.kv_cache), "image_slots": int(out.image_slots), "compute": int(out.compute)}
