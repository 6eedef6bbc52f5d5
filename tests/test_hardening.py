"""Hardening: hostile images and prompts, context limits, resources released, interrupts, threads."""

from __future__ import annotations

import gc
import io
import os
import random
import re
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama.image.preprocess import ImageError
from test_server_load import ASAN_RSS_REASON, UNDER_ASAN, process_rss


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=256) as m:
        yield m


def encoded(fmt: str, size=(90, 50), **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_corrupt_images_raise_image_error_or_decode(model, fmt):
    data = encoded(fmt)
    rng = random.Random(fmt)
    outcomes = {"ok": 0, "error": 0}
    for case in range(60):
        buf = bytearray(data)
        if case % 3 == 0:
            buf = buf[: rng.randrange(1, len(buf))]
        else:
            for _ in range(rng.randint(1, 20)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            pre = mllama.preprocess(bytes(buf), model)
            assert pre.pixel_values.shape == (4, 3, 56, 56) and np.isfinite(pre.pixel_values).all()
            outcomes["ok"] += 1
        except ImageError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_animated_gif_uses_the_first_frame(model):
    frames = [Image.new("RGB", (60, 30), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = mllama.preprocess(buf.getvalue(), model).pixel_values
    assert np.array_equal(first, mllama.preprocess(frames[0], model).pixel_values)


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 1), (3, 9000)])
def test_absurd_aspect_ratios(model, size):
    image = Image.new("RGB", size, (10, 200, 30))
    pre = mllama.preprocess(image, model)
    assert 1 <= pre.n_tiles <= 4 and np.isfinite(pre.pixel_values).all()
    assert model.encode_image(image).shape == (4, 17, 96)


@pytest.mark.parametrize("text", ["\udcff\udc80 broken utf-8", "bell\x07 nul\x00 esc\x1b[31m", "<|eot_id|><|begin_of_text|><|image|>",
                                  "\u202e right-to-left \ufeff bom", "a" * 300])
def test_hostile_prompt_text(model, text):
    tokens, _ = model.chat_prompt([{"role": "user", "content": text[:200]}])
    assert tokens.count(128256) == 0 and tokens.count(128000) == 1
    reply = model.chat([{"role": "user", "content": text[:200]}], max_tokens=4, temperature=0.0)
    assert reply["usage"]["completion_tokens"] <= 4


def test_prompt_exactly_at_the_context_limit_and_one_past(model):
    n_ctx = model.n_ctx
    exact = [128000] + [1000] * (n_ctx - 1)
    reply = model.stream_text(exact, temperature=0.0).finish()
    assert reply.usage.completion_tokens <= 1 and reply.finish_reason in ("length", "stop")
    with pytest.raises(mllama.ContextOverflowError, match=f"{n_ctx + 1} tokens but the context holds {n_ctx}"):
        list(model.generate_tokens(exact + [1000], temperature=0.0))
    assert model.describe(Image.new("RGB", (50, 50)), max_tokens=3, temperature=0.0) is not None  # still usable


def rss() -> int:
    return process_rss(os.getpid())


def test_rss_flat_over_repeated_describe(model):
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    for _ in range(20):
        model.describe(image, max_tokens=4, temperature=0.0)
    gc.collect()  # both readings after a full collection: cyclic garbage (in a process with a large heap, such
    # collections are rare) is no leak, and earlier tests' garbage must not be freed inside the measured loop
    before = rss()
    for i in range(1000):
        model.describe(image if i % 2 else np.asarray(image), max_tokens=4, temperature=0.0)
    gc.collect()
    if UNDER_ASAN:
        pytest.skip(ASAN_RSS_REASON)
    assert rss() - before < 8 * 2**20


def test_load_close_cycles_release_files_and_maps(small_gguf):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def maps() -> int:
        return sum(str(small_gguf) in line for line in open("/proc/self/maps"))

    mllama.Model(small_gguf).close()
    base_fd, base_rss = fds(), rss()
    for _ in range(100):
        with mllama.Model(small_gguf) as m:
            assert maps() >= 1
            m.hparams
    assert fds() == base_fd and maps() == 0
    if UNDER_ASAN:
        pytest.skip(ASAN_RSS_REASON)
    assert rss() - base_rss < 16 * 2**20


def test_keyboard_interrupt_mid_generation_leaves_the_model_usable(model):
    prompt = [128000] + model.tokenize("Tell me a long story.")
    expected = list(model.generate_tokens(prompt, temperature=0.0, max_tokens=20))
    # Python's handler, whatever this suite was started from (a background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in model.generate_tokens([128000] + model.tokenize("Count forever."), temperature=0.0, max_tokens=100000):
            time.sleep(0.001)
    timer.join()
    signal.signal(signal.SIGINT, previous)
    assert list(model.generate_tokens(prompt, temperature=0.0, max_tokens=20)) == expected


def test_two_threads_serialize(model):
    prompts = [[128000] + model.tokenize(t) for t in ("First prompt here.", "A different second prompt.")]
    sequential = [list(model.generate_tokens(p, temperature=0.0, max_tokens=12)) for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = list(model.generate_tokens(prompts[i], temperature=0.0, max_tokens=12))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[0], results[1]] == sequential


def test_interleaved_generations_in_one_thread_queue_and_finish(model):
    # one sequence (n_seq_max 1): the second waits in the scheduler; pulling it runs the first to its end
    alone = [list(model.generate_tokens([128000, t], temperature=0.0, max_tokens=5)) for t in (1000, 2000)]
    first = model.generate_tokens([128000, 1000], temperature=0.0, max_tokens=5)
    second = model.generate_tokens([128000, 2000], temperature=0.0, max_tokens=5)
    head = next(first)
    assert list(second) == alone[1]
    assert [head] + list(first) == alone[0]
    third = model.generate_tokens([128000, 1000], temperature=0.0, max_tokens=5)
    next(third)
    third.close()  # an abandoned generation frees its sequence
    assert model.scheduler.running == [] and not any(model.scheduler.busy)


@pytest.mark.parametrize("options, error, fragment", [
    ({"max_tokens": "5"}, TypeError, "max_tokens must be an integer"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number"),
    ({"top_k": 1.5}, TypeError, "top_k must be an integer"),
    ({"stop": [None]}, TypeError, "stop must be a string"),
    ({"top_p": 7.0}, ValueError, "top_p must be within [0, 1]"),
    ({"min_p": 2.0}, ValueError, "min_p must be within [0, 1]"),
    ({"repeat_penalty": 0.0}, ValueError, "repeat_penalty must be > 0"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"frequency_penalty": 3.0}, ValueError, "frequency_penalty must be within [-2, 2]"),
    ({"max_tokens": 0}, ValueError, "max_tokens must be at least 1"),
])
def test_bad_sampling_options_raise_at_the_call_and_leave_the_model_usable(model, options, error, fragment):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = model.chat(messages, max_tokens=3, temperature=0)["choices"][0]["message"]["content"]
    with pytest.raises(error, match=re.escape(fragment)):
        model.chat(messages, **options)
    assert model.scheduler.running == [] and model.scheduler.n_waiting == 0 and not any(model.scheduler.busy)
    assert model.chat(messages, max_tokens=3, temperature=0)["choices"][0]["message"]["content"] == expected


def test_a_request_failing_mid_generation_ends_alone(model, monkeypatch):
    """Any exception while one request samples (not only ValueError) ends that request; the model goes on."""
    from mllama.generation.scheduler import Scheduler

    sample = Scheduler._sample_stream

    def failing(self, s, logits, drawn):
        if s.request.params.seed == 13 and s.record.completion_tokens == 2:
            raise KeyError("a failure of this request's own")
        return sample(self, s, logits, drawn)

    monkeypatch.setattr(Scheduler, "_sample_stream", failing)
    prompt = [128000] + model.tokenize("Tell me something.")
    with pytest.raises(KeyError, match="own"):
        list(model.generate_tokens(prompt, temperature=0.0, max_tokens=8, seed=13))
    assert model.scheduler.running == [] and not any(model.scheduler.busy)
    assert len(list(model.generate_tokens(prompt, temperature=0.0, max_tokens=8, seed=14))) == 8


def test_requests_nobody_reads_do_not_run(model, tmp_path):
    """A chat_many with one bad conversation runs none of them; a stream dropped before it is read is cancelled."""
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    good = [{"role": "user", "content": "Hello there"}]
    bad = [{"role": "user", "content": [{"type": "image", "image": str(not_an_image)}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ImageError, match="notes.jpg"):  # the error names the file
        model.chat_many([good, good, bad])
    assert model.scheduler.n_waiting == 0 and model.scheduler.running == []
    stream = model.chat(good, stream=True, max_tokens=50)
    del stream
    generated = model.scheduler.stats["generated_tokens"]
    model.chat(good, max_tokens=2)
    assert model.scheduler.stats["generated_tokens"] - generated == 2


def test_a_failed_turn_leaves_the_chat_history_as_it_was(model):
    chat = model.chat_session()
    chat.send("Hello", max_tokens=2, temperature=0)
    before = [dict(m) for m in chat.messages]
    with pytest.raises(TypeError):
        chat.send("Again", not_an_option=1)
    with pytest.raises(mllama.ContextOverflowError):
        chat.send("word " * 400)  # over n_ctx 256
    assert chat.messages == before
    chat.send("Again", max_tokens=2, temperature=0)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("sizes", [{"n_ctx": -5}, {"n_batch": -1}, {"n_threads": -3}, {"n_seq_max": -2},
                                   {"n_ctx": 2.5}, {"n_image_slots": True}])
def test_model_sizes_are_checked(small_gguf, sizes):
    with pytest.raises(ValueError, match=f"{next(iter(sizes))} must be a whole number"):
        mllama.Model(small_gguf, **sizes)


CLOSE_RACE = """
import sys, threading, mllama
from mllama import ModelClosedError
for _ in range(30):
    m = mllama.Model(sys.argv[1], n_ctx=64)
    started = threading.Event()
    def read():
        try:
            while True:
                m.meta_string("general.name"), m.tensors(), m.info
                started.set()
        except ModelClosedError:
            started.set()
    t = threading.Thread(target=read)
    t.start()
    started.wait()
    m.close()
    t.join()
print("ok")
"""


def test_close_waits_for_the_c_calls_of_other_threads(small_gguf):
    """close() frees the model only once no other thread is inside a C call on it (it freed it under a streaming
    thread's metadata read: a crash), and no call starts once it waits."""
    m = mllama.Model(small_gguf, n_ctx=64)
    with m.using():  # what meta_string, tensors, info... hold around their C calls
        closer = threading.Thread(target=m.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive() and not m.closed
        with pytest.raises(mllama.ModelClosedError):
            m.meta_string("general.name")
    closer.join(30)
    assert m.closed and not closer.is_alive()


def test_closing_a_model_while_another_thread_reads_it(small_gguf):
    """Readers in a tight loop neither crash close() nor starve it (in a child: a crash fails the test only)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CLOSE_RACE, str(small_gguf)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
