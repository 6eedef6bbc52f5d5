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
