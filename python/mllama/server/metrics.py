"""The server's /metrics (Prometheus text format, through prometheus-client): requests running and
waiting, tokens in and out, finish reasons, cache reuse, batch sizes, recent decode speed. One
registry per app, so that several apps in one process (tests) do not collide."""

from __future__ import annotations

import threading
import time
from collections import deque

from ..generation.results import GenerationResult


class Metrics:
    def __init__(self, model, window_s: float = 10.0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.model, self.window_s = model, window_s
        self.running = Gauge("mllama_requests_running", "Requests holding sequences", registry=r)
        self.waiting = Gauge("mllama_requests_waiting", "Requests waiting for a sequence", registry=r)
        self.preparing = Gauge("mllama_requests_preparing", "Requests being prepared (their prompts rendered, images "
                               "read) before they wait for a sequence", registry=r)  # (the queue sets its function)
        self.encoding = Gauge("mllama_requests_encoding", "Running requests whose images are in the vision tower "
                              "(their prompts wait; the other streams go on)", registry=r)
        self.sequences = Gauge("mllama_sequences", "Sequences the context holds (n_seq_max)", registry=r)
        self.requests = Counter("mllama_requests", "Requests submitted", registry=r)
        self.cancelled = Counter("mllama_requests_cancelled", "Requests stopped by their client", registry=r)
        self.finished_total = Counter("mllama_choices_finished", "Choices ended, by finish reason", ["reason"],
                                      registry=r)
        self.failed = Counter("mllama_choices_failed", "Choices ended by an error (a prompt over the context, an "
                              "image that cannot be read, ...)", registry=r)
        self.prompt_tokens = Counter("mllama_prompt_tokens", "Prompt tokens of the submitted requests", registry=r)
        self.generated = Counter("mllama_generated_tokens", "Tokens generated", registry=r)
        self.prefix_reused = Counter("mllama_prefix_tokens_reused", "Prompt tokens found in a sequence's cache",
                                     registry=r)
        self.image_hits = Counter("mllama_image_slot_hits", "Images found in an image slot (no encode)", registry=r)
        self.image_cache = Gauge("mllama_image_cache_events", "The image cache's counts since loading (memory_hits, "
                                 "disk_hits, misses, stores, evictions, bad_files, write_errors)", ["event"],
                                 registry=r)
        self.images_encoded = Gauge("mllama_images_encoded", "Images run through the vision tower since loading",
                                    registry=r)
        self.batch_rows = Histogram("mllama_batch_rows", "Rows evaluated per step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.tokens_per_s = Gauge("mllama_generated_tokens_per_second",
                                  f"Tokens generated per second over the last {window_s:g} s", registry=r)
        self.sequences.set(model.n_seq_max)
        self._recent: deque[tuple[float, int]] = deque()  # (when, tokens) of the steps within the window
        self._recent_lock = threading.Lock()  # the batch driver's thread appends, the event loop's reads
        self._seen = dict.fromkeys(model.scheduler.stats, 0)

    def submitted(self, request) -> None:
        self.requests.inc()
        self.prompt_tokens.inc(len(request.tokens))

    def finished(self, result: GenerationResult) -> None:
        self.finished_total.labels(result.finish_reason).inc()

    def stepped(self, scheduler) -> None:
        stats = dict(scheduler.stats)
        steps = stats["steps"] - self._seen["steps"]
        if steps:
            self.batch_rows.observe((stats["batch_rows"] - self._seen["batch_rows"]) / steps)
        generated = stats["generated_tokens"] - self._seen["generated_tokens"]
        self.generated.inc(generated)
        with self._recent_lock:
            self._recent.append((time.monotonic(), generated))
            self._prune(time.monotonic())  # bounded whether /metrics is read or not
        self.prefix_reused.inc(stats["prefix_tokens_reused"] - self._seen["prefix_tokens_reused"])
        self.image_hits.inc(stats["image_slot_hits"] - self._seen["image_slot_hits"])
        self._seen = stats
        self.running.set(len(scheduler.running))
        self.waiting.set(scheduler.n_waiting)
        self.encoding.set(scheduler.n_encoding)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        with self._recent_lock:
            self._prune(time.monotonic())
            self.tokens_per_s.set(sum(n for _, n in self._recent) / self.window_s)
        self.running.set(len(self.model.scheduler.running))
        self.waiting.set(self.model.scheduler.n_waiting)
        self.encoding.set(self.model.scheduler.n_encoding)
        self.images_encoded.set(self.model.engine.n_encoded)
        cache = self.model.image_cache
        for event, count in (vars(cache.stats).items() if cache is not None else ()):
            self.image_cache.labels(event).set(count)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
