"""Decoder parity: logits at every prompt position and over greedy steps, and greedy tokens, against
transformers patched to Meta's semantics (tests/reference.py), on the tiny fixture (F32 weights)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mllama
from reference import hf_greedy, hf_logits, patch_meta

EOS = [128001, 128008, 128009]


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed + 13 * w + h).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMG = {"type": "image"}


def part(image_obj):
    return {"type": "image", "image": image_obj}


def txt(t):
    return {"type": "text", "text": t}


CASES = {
    "a_text_only": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
    "b_1_tile": [{"role": "user", "content": [part(image(50, 50)), txt("Describe this image.")]}],
    "b_2_tiles": [{"role": "user", "content": [part(image(100, 40)), txt("Describe this image.")]}],
    "b_3_tiles": [{"role": "user", "content": [part(image(40, 150)), txt("Describe this image.")]}],
    "b_4_tiles": [{"role": "user", "content": [part(image(100, 100)), txt("Describe this image.")]}],
    "c_two_images": [{"role": "user", "content": [part(image(100, 40)), txt("versus"), part(image(40, 150, 1)), txt("Compare them.")]}],
    "d_text_before_image": [{"role": "user", "content": [txt("Look closely at this picture:"), part(image(150, 40)), txt("What is it?")]}],
    "e_image_second_turn": [
        {"role": "user", "content": "Hello! Can you help me?"},
        {"role": "assistant", "content": "Of course. What do you need?"},
        {"role": "user", "content": [part(image(100, 100, 2)), txt("What is in this image?")]},
    ],
}


@pytest.fixture(scope="module")
def hf_model():
    from tiny_checkpoint import build_model

    return patch_meta(build_model(seed=0))


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=512) as m:
        yield m


def prompt(model, name):
    tokens, images = model.chat_prompt(CASES[name])
    return tokens, [mllama.preprocess(im, model) for im in images], images


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_tokens(model, hf_model, name):
    tokens, pre, images = prompt(model, name)
    ours_tokens = list(model.generate_tokens(tokens, images, temperature=0.0, max_tokens=64))
    ref_tokens = hf_greedy(hf_model, tokens, pre, 64, EOS)
    assert ours_tokens == ref_tokens
    full = tokens + ref_tokens[:32]
    ours = model.forward(full, images)
    ref = hf_logits(hf_model, full, pre)
    assert ours.shape == ref.shape == (len(full), 128256)
    assert nmse(ours, ref) <= 1e-6, nmse(ours, ref)
    # the incremental path (KV cache, one token at a time) gives the same rows
    engine = model.engine
    step_logits = [engine.evaluate(tokens, model.prepare_images(images))]
    for t in ref_tokens[:8]:
        step_logits.append(engine.step(t, len(images)))
    assert nmse(np.stack(step_logits), ref[len(tokens) - 1:len(tokens) + 8]) <= 1e-6


@pytest.mark.parametrize("name", ["d_text_before_image", "e_image_second_turn", "c_two_images"])
def test_prompt_chunks_before_an_image(gguf_f32, hf_model, name):
    """A prompt evaluated in chunks of 4 tokens (n_batch): chunks that come before an image's token carry no
    cross-attention rows for it yet (the first version gave them no image column and refused the batch)."""
    with mllama.Model(gguf_f32, n_ctx=512, n_batch=4) as chunked:
        tokens, pre, images = prompt(chunked, name)
        assert tokens.index(128256) > 4
        ours = chunked.forward(tokens, images)
        ref = hf_logits(hf_model, tokens, pre)
        assert nmse(ours, ref) <= 1e-6, nmse(ours, ref)
        assert list(chunked.generate_tokens(tokens, images, temperature=0.0, max_tokens=8)) == \
            hf_greedy(hf_model, tokens, pre, 8, EOS)


def test_rows_before_the_first_image_get_no_cross_attention(model, gguf_f32):
    """Meta semantics: the test fails if rows before the first image receive cross-attention output."""
    from tiny_checkpoint import build_model

    tokens, pre, images = prompt(model, "d_text_before_image")
    first_image = tokens.index(128256)
    ours = model.forward(tokens, images)
    hf523 = hf_logits(build_model(seed=0), tokens, pre)  # unpatched: those rows attend to every vision token
    text_only = model.forward(tokens[:first_image])  # no image at all: the cross layers are skipped
    assert nmse(ours[:first_image], text_only) <= 1e-10
    assert nmse(ours[:first_image], hf523[:first_image]) > 1e-3


def test_tiles_beyond_the_image_are_masked(model, hf_model):
    tokens, pre, images = prompt(model, "b_2_tiles")
    ours = model.forward(tokens, images)
    assert nmse(ours, hf_logits(hf_model, tokens, pre)) <= 1e-6


@pytest.mark.parametrize("type_name,bound", [("f16", 1e-4), ("q8_0", 3e-3)])
def test_reduced_precision_weights(converted, model, type_name, bound):
    tokens, _, images = prompt(model, "b_4_tiles")
    ref = model.forward(tokens, images)
    with mllama.Model(converted(type_name), n_ctx=512) as low:
        err = nmse(low.forward(tokens, images), ref)
    print(f"{type_name}: logits NMSE vs F32 = {err:.3e}")
    assert err <= bound


def test_second_turn_processes_only_new_tokens(model):
    chat = model.chat_session(temperature=0.0, max_tokens=8)
    chat.send("Describe this image.", images=[image(100, 40)])
    before = model.n_decoded
    chat.send("And what colour is it?")
    decoded = model.n_decoded - before
    first_prompt, _ = model.chat_prompt(chat.messages[:1])
    second_prompt, _ = model.chat_prompt(chat.messages[:3])
    assert second_prompt[:len(first_prompt)] == first_prompt
    # at most: the tokens after the first prompt (its reply, re-tokenized, and the new turn) + 8 generated
    assert decoded <= len(second_prompt) - len(first_prompt) + 8
    assert decoded < len(second_prompt) - 10


def test_describe_and_chat_api(model):
    text = model.describe(image(100, 40), max_tokens=12, temperature=0.0)
    assert isinstance(text, str) and text
    response = model.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.0)
    assert response["object"] == "chat.completion" and response["usage"]["completion_tokens"] <= 5
    assert response["choices"][0]["finish_reason"] in ("stop", "length")
    chunks = list(model.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.0, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == response["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == response["usage"]
    assert model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.0) ["choices"] == response["choices"]


def test_errors(model):
    with pytest.raises(mllama.ContextOverflowError, match="600 tokens but the context holds 512"):
        model.forward([128000] * 600)
    with pytest.raises(ValueError, match="1 <|image|> tokens but 0 images"):
        model.forward([128000, 128256, 10])
    too_many = [{"role": "user", "content": [part(image(50, 50, i)) for i in range(5)] + [txt("hi")]}]
    with pytest.raises(mllama.ContextOverflowError, match="exceed the 4 image slots"):
        model.chat(too_many, max_tokens=1)
    with pytest.raises(mllama.TemplateError, match="incompatible with system messages"):
        model.chat([{"role": "system", "content": "x"}, {"role": "user", "content": [part(image(50, 50)), txt("hi")]}])
    with pytest.raises(TypeError, match="unknown sampling option"):
        model.chat([{"role": "user", "content": "Hi"}], temprature=0.1)
