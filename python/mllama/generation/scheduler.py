"""Continuous batching: requests wait in a queue, are admitted into free sequences between steps (the
sequence whose cache holds the longest common prefix first; images into the slot pool, encoded
unless a slot already holds them), and every step evaluates one batch: a token of every decoding
stream plus a chunk of prompt of the requests still in prefill; then, if a request's images are not
all in yet, the next stage of one's encode (half a vision layer: the streams go on meanwhile). Each
stream samples with its own parameters and random generator, stops on its own (end-of-generation,
stop strings, max_tokens, the context) and delivers its text pieces and result to its own outbox. A
cancelled request frees its sequences at the next step. Not thread-safe on its own: step() runs under
the model's lock; submit() and cancel() may come from any thread.

Each constrained stream's next grammar mask (its state has consumed the last token sampled) is started
on a worker thread right before the batch's decode, so that it is computed while the decode runs (the
native decode and llguidance both release the GIL, and the worker's numpy work then finds the GIL
free); sampling then only collects it. The output is the same as with the mask computed in line,
before sampling (`overlap_masks = False`). The draws of the step's unconstrained sampled streams run side by side
on a small thread pool (numpy's sorts and exponentials release the GIL); each stream's generator is its own, so
the tokens are those of drawing one after the other."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .._native.errors import GenerationCancelled, MllamaError
from .engine import Engine, Part
from .logprobs import entry as logprob_entry
from .request import Request, Stream
from .sampling import sample


class Scheduler:
    def __init__(self, engine: Engine, eog_ids: frozenset[int]):
        self.engine, self.eog_ids = engine, eog_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.busy = [False] * engine.n_seq
        self._mutex = threading.Lock()  # waiting, between submit() and step()
        self.stats = {"steps": 0, "batch_rows": 0, "generated_tokens": 0, "prefix_tokens_reused": 0,
                      "image_slot_hits": 0, "grammar_masks": 0, "grammar_mask_wait_s": 0.0,
                      "encode_steps": 0}
        # vision stages per step for a request's new images: its encode runs between the steps of the others
        # (a stage is half a vision layer: its attention or its MLP), so that their streams go on while it runs
        self.encode_stages = 1
        self.overlap_masks = True  # grammar masks on a worker thread during the decode (False: in line)
        self._mask_pool: ThreadPoolExecutor | None = None  # started with the first constrained stream
        self._draw_pool: ThreadPoolExecutor | None = None  # started with the first step of two sampled streams
        self.stepping = False  # within step() (a step is never run within another)

    def submit(self, request: Request) -> None:
        if len(request.streams) > self.engine.n_seq:
            raise ValueError(f"n={len(request.streams)} needs more sequences than the {self.engine.n_seq} "
                             "the context holds (n_seq_max)")
        with self._mutex:
            self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stops a request at the next step (from any thread)."""
        request.cancelled = True

    def cancel_all(self) -> None:
        """Stops every request, running or waiting, at the next step (from any thread: a server shutting down)."""
        with self._mutex:
            requests = [*self.waiting, *self.running]
        for request in requests:
            request.cancelled = True

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    @property
    def n_encoding(self) -> int:
        """Running requests whose images are still in the vision tower."""
        return sum(1 for request in self.running if request.to_encode)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def close(self) -> None:
        """Stops the worker threads, the grammar masks' and the draws' (the model is being closed)."""
        for pool in (self._mask_pool, self._draw_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._mask_pool = self._draw_pool = None

    def fail_all(self, exc: BaseException) -> None:
        """Ends every request with `exc` (a step failed outside any one request)."""
        with self._mutex:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            request.fail(exc)
        for request in list(self.running):
            self._close(request, exc)

    # --- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit, evaluate one batch, sample; call under the model's lock."""
        self.stepping = True
        try:
            self._step()
        finally:
            self.stepping = False

    def _step(self) -> None:
        self._reap()
        self._admit()
        parts, owners = self._batch()
        if parts:
            self._evaluate(parts, owners)
        self._encode()

    def _evaluate(self, parts: list[Part], owners: list[tuple[Request, Stream | None]]) -> None:
        self._prefetch_masks()
        try:
            logits = self.engine.decode(parts)
        except Exception as exc:  # the batch's requests get the error; the others go on
            for request in {id(r): r for r, _ in owners}.values():
                self._close(request, exc)
            return
        except BaseException:  # an interrupt: the batch is undone, to be evaluated again at the next step
            self.engine.undo(parts)
            self._unbatch(parts, owners)
            raise
        self.stats["steps"] += 1
        self.stats["batch_rows"] += sum(len(p.tokens) for p in parts)
        rows = [(request, stream) for (request, stream), part in zip(owners, parts) if part.outputs]
        drawn = self._draw_in_parallel([(s, logits[row]) for row, (request, stream) in enumerate(rows)
                                        for s in (request.streams if stream is None else [stream])])
        try:
            for row, (request, stream) in enumerate(rows):
                if stream is None:  # a prompt finished: every choice samples from its logits
                    self._fork(request)
                    for s in request.streams:
                        self._sample(s, logits[row], drawn.get(id(s)))
                else:
                    self._sample(stream, logits[row], drawn.get(id(stream)))
        except BaseException as exc:  # an interrupt not deferred (interrupts.py): no stream left without its token
            for request, _ in rows:
                if any(not s.done and s.next_token is None for s in request.streams):
                    self._close(request, exc)
            raise
        self._reap()

    def _encode(self) -> None:
        """The next encode_stages stages of the vision tower for the first request whose images are not all in
        yet (the batches of the other requests run between them); its prompt is evaluated once they are. An image
        put into a slot that other requests await (the same image in several) is in for all of them."""
        request = self._next_to_encode()
        if request is not None:
            try:
                self._encode_stages(request)
            except Exception as exc:  # its image only: the request ends, the others go on
                self._close(request, exc)
        keys = self.engine.slot_keys
        for request in self.running:
            if request.to_encode:
                request.to_encode = [(slot, image) for slot, image in request.to_encode if keys[slot] != image.key]

    def _next_to_encode(self) -> Request | None:
        """The request whose encode goes on: one awaiting the encode under way (its entry put first: the request that
        began it may have ended, and beginning another image would drop its stages), else the first with images to
        encode."""
        under_way = self.engine.encoding[0] if self.engine.encoding is not None else None
        for request in self.running:
            entries = [entry for entry in request.to_encode if entry[0] == under_way]
            if entries:
                request.to_encode = entries[:1] + [entry for entry in request.to_encode if entry is not entries[0]]
                return request
        return next((request for request in self.running if request.to_encode), None)

    def _encode_stages(self, request: Request) -> None:
        engine = self.engine
        while request.to_encode:
            slot, image = request.to_encode[0]
            if engine.encoding is None or engine.encoding[0] != slot:  # (an interrupted encode starts again)
                if engine.begin_encode(slot, image) == 0:  # found in the image cache
                    request.to_encode.pop(0)
                    continue
            self.stats["encode_steps"] += 1
            if engine.encode_step(self.encode_stages) == 0:
                request.to_encode.pop(0)
            return

    def _draw_in_parallel(self, jobs: list[tuple[Stream, np.ndarray]]) -> dict[int, Future]:
        """The draws of the streams that sample without a grammar, started on the draw pool (id(stream) ->
        its future token) where there are two or more of them; the others sample in line (_sample)."""
        jobs = [(s, row) for s, row in jobs if not s.done and s.grammar is None and s.request.params.temperature > 0.0
                and np.isfinite(row).all()]
        if len(jobs) < 2:
            return {}
        if self._draw_pool is None:
            self._draw_pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="mllama-sample")
        return {id(s): self._draw_pool.submit(sample, row, s.history, s.request.params, s.rng) for s, row in jobs}

    def _batch(self) -> tuple[list[Part], list[tuple[Request, Stream | None]]]:
        engine, budget = self.engine, self.engine.n_batch
        parts, owners = [], []
        for request in self.running:
            for s in request.streams:
                if s.done or s.next_token is None or budget == 0:
                    continue
                state = engine.seqs[s.seq]
                parts.append(Part(s.seq, [s.next_token], len(state.tokens), state.slots,
                                  engine.rows_for(s.seq, [s.next_token]), [0]))
                owners.append((request, s))
                s.next_token = None
                budget -= 1
        # decoding streams in sequence order: consecutive ids attend in one group (csrc/runtime/batch.h), whatever
        # order their requests came in
        ordered = sorted(zip(parts, owners), key=lambda pair: pair[0].seq)
        parts, owners = [part for part, _ in ordered], [owner for _, owner in ordered]
        for request in self.running:
            if not request.in_prefill or request.to_encode or budget == 0:
                continue
            seq, first = request.streams[0].seq, request.n_evaluated
            chunk = request.tokens[first:first + budget]
            last = first + len(chunk) == len(request.tokens)
            parts.append(Part(seq, chunk, first, request.slots, engine.rows_for(seq, chunk),
                              [len(chunk) - 1] if last else []))
            owners.append((request, None))
            request.n_evaluated += len(chunk)
            budget -= len(chunk)
        return parts, owners

    def _unbatch(self, parts: list[Part], owners: list[tuple[Request, Stream | None]]) -> None:
        """Undoes _batch: each stream's token and each prompt's chunk wait for the next batch."""
        for part, (request, stream) in zip(parts, owners):
            if stream is not None:
                stream.next_token = part.tokens[0]
            else:
                request.n_evaluated -= len(part.tokens)

    def _sample(self, s: Stream, logits: np.ndarray, drawn: Future | None = None) -> None:
        if s.done:
            return
        try:
            self._sample_stream(s, logits, drawn)
        except Exception as exc:  # this request's own failure (its grammar, its options): it ends, the others go on
            self._close(s.request, exc)

    def _sample_stream(self, s: Stream, logits: np.ndarray, drawn: Future | None) -> None:
        request, params = s.request, s.request.params
        if drawn is None and not np.isfinite(logits).all():  # a drawn stream's logits were checked before
            self.engine.forget_images(im.key for im in request.images)  # (a bad cache entry: not trusted again)
            self._close(request, MllamaError("the model produced non-finite logits (NaN or Inf): corrupt weights "
                                             "or a numeric overflow"))
            return
        allowed = self._mask(s) if s.grammar is not None else None  # ValueError: the grammar allows nothing
        token = drawn.result() if drawn is not None else sample(logits, s.history, params, s.rng, allowed)
        if s.record.first_token is None:
            s.record.first_token = time.perf_counter()
        if token in self.eog_ids:
            s.finish("stop")
            return
        if s.grammar is not None:
            s.grammar.advance(token)  # ValueError: one of llguidance's limits
        if s.logprobs is not None:  # from the raw logits (see logprobs.py)
            s.logprobs.append(logprob_entry(logits, token, request.logprobs, s.tokenizer))
            s.emit("logprob", s.logprobs[-1])
        s.record.completion_tokens += 1
        self.stats["generated_tokens"] += 1
        s.history.append(token)
        s.emit("token", token)
        if s.push_text(token, params.stop):
            s.finish("stop_string")
            return
        if s.grammar is not None and s.grammar.done:  # complete: only end-of-generation could follow
            s.finish("stop")
            return
        # the last sampled token is never evaluated, so a full context still yields one token
        room = self.engine.n_ctx - len(request.tokens) + 1
        limit = min(params.max_tokens, room) if params.max_tokens is not None else room
        if s.record.completion_tokens >= limit:
            s.finish("length")
            return
        s.next_token = token

    def _mask(self, s: Stream) -> np.ndarray:
        """The stream's grammar mask for this step: collected from the worker, or computed here. The
        time sampling waits for it is the grammar's share of the critical path (stats)."""
        started = time.perf_counter()
        allowed = s.grammar.allowed_tokens()
        self.stats["grammar_masks"] += 1
        self.stats["grammar_mask_wait_s"] += time.perf_counter() - started
        return allowed

    def _prefetch_masks(self) -> None:
        """With overlap_masks, start the next mask of every running constrained stream on the worker
        thread (a mask already started stays), to be computed while the decode runs."""
        if not self.overlap_masks:
            return
        for request in self.running:
            for s in request.streams:
                if s.grammar is not None and not s.done:
                    if self._mask_pool is None:
                        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="mllama-grammar")
                    s.grammar.prefetch(self._mask_pool)

    # --- admission, forks, the end of requests -------------------------------------------------
    def _admit(self) -> None:
        """Admits waiting requests in their order while sequences are free. One whose images find no slot (every
        slot read by running requests) keeps its place, and only requests without images go past it (a text-only
        request had waited behind it for a running request to end); none goes past one that lacks sequences."""
        index, blocked = 0, False
        while True:
            with self._mutex:
                self._drop_cancelled()
                while index < len(self.waiting) and blocked and self.waiting[index].images:
                    index += 1
                if index >= len(self.waiting):
                    return
                request = self.waiting[index]
                free = [i for i, b in enumerate(self.busy) if not b]
                if len(free) < len(request.streams):
                    return
                del self.waiting[index]
            try:
                admitted = self._start(request, free)
            except BaseException as exc:  # a bad prompt or image: this request only
                request.fail(exc)
                continue
            if not admitted:  # wait for a slot, in its place
                with self._mutex:
                    self.waiting.insert(index, request)
                index, blocked = index + 1, True

    def _drop_cancelled(self) -> None:
        """Ends the waiting requests stopped while they waited, wherever they are in the queue (under _mutex: one
        behind a live request had kept its place, and the server's queue bound counted it, until it came first)."""
        if any(request.cancelled for request in self.waiting):
            gone = [request for request in self.waiting if request.cancelled]
            self.waiting = deque(request for request in self.waiting if not request.cancelled)
            for request in gone:  # its readers learn of it
                request.fail(GenerationCancelled("the request was cancelled"))

    def _start(self, request: Request, free: list[int]) -> bool:
        engine, started = self.engine, time.perf_counter()  # prompt time counts the image encodes
        ready = set(engine.slot_keys) | engine.awaited().keys()  # in a slot, or being put into one for another request
        held = sum(im.key in ready for im in request.images)
        keys_before = list(engine.slot_keys)  # (a failed start gives back the slots its claim emptied)
        slots = engine.claim_slots(request.images, pending=request.to_encode)  # encoded by _encode
        if slots is None:
            return False
        try:
            reuse = {seq: engine.reusable(seq, request.tokens, request.images) for seq in free}
            order = sorted(free, key=lambda q: -reuse[q])  # the longest cached prefix for the prompt
            first, others = order[0], sorted(order[1:], key=lambda q: reuse[q])[:len(request.streams) - 1]
            request.n_evaluated = engine.start(first, request.tokens, request.images, slots)
            request.slots = slots
            for stream, seq in zip(request.streams, [first] + others):
                stream.seq = seq
                stream.record.started = started
                self.busy[seq] = True
            self.running.append(request)
        except BaseException:  # nothing of it is kept: its slots, its sequences
            for stream in request.streams:
                if stream.seq >= 0:
                    self.busy[stream.seq], stream.seq = False, -1
            request.slots, request.to_encode = [], []
            engine.unclaim_slots(slots, keys_before)
            raise
        self.stats["prefix_tokens_reused"] += request.n_evaluated
        self.stats["image_slot_hits"] += held
        return True

    def _fork(self, request: Request) -> None:
        """The prompt is in the first stream's sequence: the other choices get a copy."""
        first = request.streams[0].seq
        for s in request.streams[1:]:
            self.engine.copy_sequence(first, s.seq)

    def reap(self) -> None:
        """Frees now the sequences and slots of requests cancelled or ended since the last step (under the model's
        lock, outside a step: an async task cancelled had left them busy until another step ran)."""
        if not self.stepping:
            self._reap()

    def _reap(self) -> None:
        for request in list(self.running):
            if request.cancelled or all(s.done for s in request.streams):
                self._close(request, None)

    def _close(self, request: Request, error: BaseException | None) -> None:
        for s in request.streams:  # freed before its readers learn of the end (a reader on another thread)
            if s.seq >= 0:
                self.busy[s.seq] = False
        awaited = {slot for other in self.running if other is not request for slot, _ in other.to_encode}
        for slot, _ in request.to_encode:  # its encode under way stops (its slot holds nothing), unless another
            if slot not in awaited:        # request awaits the same image there
                self.engine.cancel_encode(slot)
        request.to_encode = []
        if request in self.running:
            self.running.remove(request)
            self.engine.release_slots(request.slots)
            request.slots = []
        if error is not None:
            request.fail(error)
        elif request.cancelled:
            request.fail(GenerationCancelled("the request was cancelled"))
