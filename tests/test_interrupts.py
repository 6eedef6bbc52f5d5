"""Ctrl-C and the garbage collector against the scheduler's state: a SIGINT that arrives in the middle of a
step is raised after it (interrupts.py), so no stream is left without its token and no sequence or image
slot stays held; the stream of another request in the same batch goes on to the same text; a dropped stream
cleaned up by the GC in the middle of a step does not run a step inside it; an interrupt anywhere in
Handle.using() leaves no user counted (close() would wait for it for ever)."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading

import pytest

import mllama
import mllama.generation.engine as engine_module
import mllama.generation.scheduler as scheduler_module
from mllama._native import handle as handle_module
from mllama._native.errors import ContextOverflowError, ModelClosedError

A = [{"role": "user", "content": "Tell me about lighthouses."}]
B = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def text_of(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def whole(model, messages) -> str:
    return model.chat(messages, **GREEDY)["choices"][0]["message"]["content"]


def sigint_once(monkeypatch, module, name):
    """`module.name` sends this process a real SIGINT the first time it runs (in the middle of a step)."""
    real, sent = getattr(module, name), []

    def sending(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, sending)
    return sent


@pytest.mark.skipif(sys.platform == "win32", reason="a real SIGINT to this process")
def test_ctrl_c_in_a_step_stops_its_caller_only(gguf_f32, monkeypatch):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (what an interactive session has)
    with mllama.Model(gguf_f32, n_ctx=512, n_seq_max=2) as m:
        expected_b = whole(m, B)
        a, b = m.chat(A, stream=True, **GREEDY), m.chat(B, stream=True, **GREEDY)
        read_b = [next(b) for _ in range(3)]
        next(a)
        sent = sigint_once(monkeypatch, scheduler_module, "sample")  # while the batch of both is sampled
        with pytest.raises(KeyboardInterrupt):
            for _ in a:
                pass
        assert sent and text_of(read_b + list(b)) == expected_b  # the other request went on, unharmed
        assert m.scheduler.running == [] and not any(m.scheduler.busy)
        sent = sigint_once(monkeypatch, engine_module.Engine, "encode_step")  # while its image is encoded
        with pytest.raises(KeyboardInterrupt):
            m.describe(_png(), max_tokens=4)
        assert sent and m.scheduler.running == [] and not any(m.scheduler.busy) and not any(m._engine.slot_refs)
        assert whole(m, B) == expected_b


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_a_dropped_stream_cleaned_up_by_the_gc_within_a_step(gguf_f32, monkeypatch):
    """The GC can run at any allocation, inside another request's step: the dropped stream's cleanup only
    cancels it there (a step run inside the step decoded tokens into a sequence given to another request)."""
    c_messages = [{"role": "user", "content": "a rather longer prompt, so that its cache cells are many " * 2}]
    with mllama.Model(gguf_f32, n_ctx=512, n_seq_max=2) as m:
        expected_b, expected_c = whole(m, B), whole(m, c_messages)
    with mllama.Model(gguf_f32, n_ctx=512, n_seq_max=2) as m:
        real, collect = engine_module.Engine.decode, []

        def decode(self, parts):
            if collect:
                collect.clear()
                gc.collect()  # as the cyclic GC would, at some allocation of this step
            return real(self, parts)

        monkeypatch.setattr(engine_module.Engine, "decode", decode)
        cancels = []  # whether each cancel came within a step (the dropped stream's, run by the GC there)
        cancel = scheduler_module.Scheduler.cancel
        monkeypatch.setattr(scheduler_module.Scheduler, "cancel",
                            lambda self, request: (cancels.append(self.stepping), cancel(self, request)))
        gc.disable()
        try:
            dropped = m.stream_text(m.tokenize("<|begin_of_text|>" + "a first prompt " * 10, special=True), **GREEDY)
            for _ in range(3):
                next(dropped)
            b = m.chat(B, stream=True, **GREEDY)
            read_b = [next(b) for _ in range(3)]
            c = m.chat(c_messages, stream=True, **GREEDY)  # waits for a sequence
            del dropped
            collect.append(True)
            assert text_of(read_b + list(b)) == expected_b and text_of(c) == expected_c
            assert cancels[:1] == [True]  # the cleanup did run within a step, and only cancelled there
        finally:
            gc.enable()


def test_an_interrupt_on_the_way_into_using_leaves_no_user(gguf_f32):
    """At each line from the start of using() to its block (a tracer raising there stands for a Ctrl-C)."""
    import inspect

    source, first = inspect.getsourcelines(handle_module.Handle.using.__wrapped__)
    lines = range(first, first + next(i for i, text in enumerate(source) if "finally:" in text))
    m = mllama.Model(gguf_f32, n_ctx=256)
    raised = 0
    for line in lines:
        def tracer(frame, event, arg, line=line):
            if frame.f_code.co_filename == handle_module.__file__ and event == "line" and frame.f_lineno == line:
                sys.settrace(None)
                raise KeyboardInterrupt
            return tracer

        sys.settrace(tracer)
        try:
            m.tensors()  # metadata: through using()
        except KeyboardInterrupt:
            raised += 1
        finally:
            sys.settrace(None)
        assert m._users == 0, line
    assert raised >= 6  # every line that runs on the way in: 7 of these 11 (decorator, def, docstring, raise: not)
    closing = threading.Thread(target=m.close)
    closing.start()
    closing.join(30)
    assert not closing.is_alive() and m.closed
    with pytest.raises(ModelClosedError):
        m.n_decoded


def test_one_image_more_times_than_the_slots_fails_before_any_work(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=512, n_image_slots=2) as m:
        image = _png()
        content = [{"type": "image", "image": image}] * 3 + [{"type": "text", "text": "Which?"}]
        with pytest.raises(ContextOverflowError, match="3 images exceed the 2 image slots"):
            m.chat([{"role": "user", "content": content}], max_tokens=2)
        assert m.n_decoded == 0
