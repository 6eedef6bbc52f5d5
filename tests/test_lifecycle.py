"""The native objects' lifecycle and the C ABI's edges, as users reach them from Python: objects kept past
close(), a close() inside a step, metadata of the wrong type, token ids that are not integers, sizes beyond
what the C side (int32) or ggml (threads) takes. Each had crashed the process or read freed memory."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFValueType

import mllama
from gguf_edit import rewrite
from mllama._native.ffi import ffi, lib


@pytest.fixture
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=128, n_seq_max=2, n_image_slots=2) as m:
        yield m


def test_an_engine_or_scheduler_kept_past_close_raises(gguf_f32):
    model = mllama.Model(gguf_f32, n_ctx=128)
    engine, scheduler = model.engine, model.scheduler
    request = model.submit(model.tokenize("Hello"), max_tokens=2)  # (queued, not yet run)
    model.close()
    with pytest.raises(mllama.ModelClosedError):
        engine.length(0)  # (read freed memory: garbage lengths, then heap corruption)
    with pytest.raises(mllama.ModelClosedError):
        engine.evaluate(model.tokenize("Hi"), [], seq=0)
    scheduler.step()
    assert [kind for kind, _ in request.streams[0].events][-1:] == ["error"]


def test_close_inside_a_step_is_refused(model):
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)
    refused = []

    def close_now():
        if not refused:
            try:
                model.close()
            except mllama.MllamaError as exc:
                refused.append(str(exc))
    tokens, images = model.chat_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                                     {"type": "text", "text": "Hi"}]}])
    encoding = model.submit(tokens, images, max_tokens=3, temperature=0)  # its image encoded in steps meanwhile
    model.submit(model.tokenize("Hello"), max_tokens=3, temperature=0, notify=close_now)
    for _ in range(100):
        model.run_step()
    assert refused and "inside a step" in refused[0] and not model.closed  # (closing there crashed: SIGSEGV)
    assert encoding.streams[0].events[-1][0] == "result"


def test_integer_metadata_of_another_type(gguf_f32, small_gguf, tmp_path):
    with mllama.Model(gguf_f32) as model:
        assert model.meta_ints("tokenizer.ggml.tokens") == []  # (ggml asserted: the process aborted)
        assert lib.mllama_model_meta_ints(ffi.NULL, b"x", ffi.NULL, 0) == -1
        assert ffi.string(lib.mllama_last_error()).decode() == "meta_ints needs a model and a key"
    key = "mllama.attention.cross_attention_layers"
    strings = rewrite(small_gguf, tmp_path / "strings.gguf", keys={key: (["1", "3"], GGUFValueType.ARRAY)})
    with pytest.raises(mllama.ModelLoadError, match=f"'{key}' is not an integer array"):
        mllama.Model(strings)


def test_token_ids_must_be_integers(model):
    for bad in ([1.9, 2.9], [True, False]):  # (taken as the ids they round to)
        with pytest.raises(ValueError, match="is not a token id"):
            model.forward(bad)
        with pytest.raises(ValueError, match="is not a token id"):
            model.generate(bad, stream=False, max_tokens=1)
    assert model.forward(np.array([1, 2], np.int64)).shape[0] == 2


@pytest.mark.parametrize("sizes, message", [
    ({"n_threads": 600}, "n_threads 600 exceeds ggml's 512"),  # (accepted: a decode then never ended)
    ({"n_ctx": 2**31}, "n_ctx 2147483648 is out of range"),  # (cffi's OverflowError named no argument)
    ({"n_gpu_layers": 99999999999}, "n_gpu_layers 99999999999 is out of range"),
    ({"rpc_timeout": float("inf")}, "rpc_timeout must be > 0 and <= 2147483 seconds"),  # (a traceback in the CLI)
    ({"rpc_io_timeout": 1e10}, "rpc_io_timeout must be >= 1 and <= 2147483 seconds"),
    ({"tensor_split": [1e39]}, "within float32's range"),  # (an infinite weight, said to be negative)
    ({"tensor_split": [1e-46]}, "within float32's range"),  # (all zero as float32)
])
def test_sizes_beyond_the_c_side(small_gguf, sizes, message):
    with pytest.raises((ValueError, mllama.ModelLoadError), match=message):  # (Python's check, or the C side's)
        mllama.Model(small_gguf, **sizes)


def test_context_precisions_are_checked(model):
    params = ffi.new("mllama_context_params *", lib.mllama_context_default_params())
    params.cross_kv_f32 = 7
    out = ffi.new("mllama_context **")
    with model.using() as handle:
        status = lib.mllama_context_init(handle, params, out)
    assert status != lib.MLLAMA_OK and out[0] == ffi.NULL
    assert "take 1 (F32), 0 (F16) or -1 (auto), not 7" in ffi.string(lib.mllama_last_error()).decode()


def test_exit_while_a_daemon_thread_generates(gguf_f32):
    """The finalizer that frees an unclosed model at interpreter exit waits for the step under way in another
    thread (it had freed the context under a running decode: SIGSEGV, 5 runs of 5)."""
    import subprocess
    import sys

    code = f"""
import threading, time, mllama
m = mllama.Model({str(gguf_f32)!r}, n_ctx=1024)
tokens = m.tokenize("<|begin_of_text|>" + " hello" * 300, special=True)
started = threading.Event()
def generate():
    while True:
        for _ in m.stream_text(tokens, temperature=0, max_tokens=400):
            started.set()
threading.Thread(target=generate, daemon=True).start()
started.wait(60)
"""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_model_is_neither_copied_nor_pickled(model):
    """copy.copy had shared the handle (the original's collection closed the copy), pickle a cffi TypeError."""
    import copy
    import pickle

    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            attempt(model)
    assert not model.closed


@pytest.mark.parametrize("one", ["photo.png", b"\x89PNG", np.zeros((32, 32, 3), np.uint8)])
def test_one_image_not_in_a_list_is_refused(model, one):
    """A path had been read letter by letter ("no such file 'p'"), an array as 32 images."""
    with pytest.raises(TypeError, match=r"images must be a list of images, .*pass \[image\]"):
        model.generate("<|begin_of_text|>Hi", images=one, max_tokens=1)
    assert model.generate("<|begin_of_text|>Hi", images=None, stream=False, max_tokens=1, temperature=0) == \
        model.generate("<|begin_of_text|>Hi", stream=False, max_tokens=1, temperature=0)


def test_streamed_calls_check_their_options_at_the_call(model):
    """stream_text, generate and a streamed chat turn raised bad options only at the first piece."""
    tokens = model.tokenize("<|begin_of_text|>Hi", special=True)
    with pytest.raises(ValueError, match="top_p"):
        model.stream_text(tokens, top_p=7)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("<|begin_of_text|>Hi", top_p=7)
    chat = model.chat_session()
    with pytest.raises(ValueError, match="top_p"):
        chat.send("Hello", stream=True, top_p=7)
    assert chat.messages == []  # the refused turn left nothing
    reply = chat.send("Hello", stream=True, max_tokens=2, temperature=0)
    alone = model.chat([{"role": "user", "content": "Hello"}], max_tokens=2, temperature=0)
    assert "".join(reply) == alone["choices"][0]["message"]["content"]


def test_finish_after_close_says_the_stream_has_no_result(model):
    stream = model.generate("<|begin_of_text|>Hi", max_tokens=4)
    next(stream)
    stream.close()
    with pytest.raises(mllama.GenerationCancelled, match="closed before its end"):
        stream.finish()  # (a bare AssertionError; None under python -O)
