"""An image encoded in steps (mllama_context_encode_begin/step: the vision tower half a layer or more at a time, decode
batches between them) leaves in its slot the bits of one whole encode; the steps' argument checks and ends; and
the batch scheduler, which encodes new images in steps, keeps the other streams going meanwhile and gives every
request the answer it gives alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama._native.ffi import ffi, lib
from mllama._native.slot_state import get_slot_state

BOS, IMAGE = 128000, 128256
SIZES = {"4 tiles": (100, 100), "1 tile": (50, 50)}  # at the fixture's 56-pixel tiles


def picture(size, seed=0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["f32", "bf16"])
def model(request, converted):
    """F32 weights (ggml's ops), and BF16 vision weights (our BF16 GEMMs and attention where the CPU has them)."""
    with mllama.Model(converted(request.param), n_image_slots=2, image_cache_bytes=0, n_seq_max=2,
                      n_ctx=256) as m:
        yield m


def n_stages(model) -> int:
    hp = model.hparams
    # the embeddings, each layer's two halves, the projector, each cross-attention layer's K/V
    return 1 + 2 * (hp.v_n_layer + hp.v_n_global_layer) + 1 + len(hp.cross_attention_layers)


def run_in_steps(engine, slot, image, per_step) -> list[int]:
    left = [engine.begin_encode(slot, image)]
    while left[-1]:
        left.append(engine.encode_step(per_step))
    return left


@pytest.mark.parametrize("kind", list(SIZES))
# 1: every stage alone; 4 and 5 (the fixture: 9 tower stages, the projector, 2 cross layers): spans from the tower
# through the projector into the cross layers, and from the tower to the projector then the cross layers; 0: all
@pytest.mark.parametrize("per_step", [1, 4, 5, 0])
def test_steps_leave_the_bits_of_one_encode(model, kind, per_step):
    engine = model.engine
    image = model.prepare_images([picture(SIZES[kind], seed=len(kind))])[0]
    engine.encode(0, image)
    whole = bytes(get_slot_state(model._ctx, 0))
    engine.slot_keys[1] = "stale"
    left = run_in_steps(engine, 1, image, per_step)
    total = n_stages(model)
    step = total if per_step == 0 else per_step
    assert left == [total] + [max(0, total - step * k) for k in range(1, -(-total // step) + 1)]
    assert bytes(get_slot_state(model._ctx, 1)) == whole
    assert engine.slot_keys[1] == image.key and engine.encoding is None


def test_bad_steps_are_refused_with_a_reason(model):
    engine, ctx = model.engine, model._ctx
    image = model.prepare_images([picture(SIZES["1 tile"], seed=7)])[0]
    with pytest.raises(ValueError, match="no image encode in steps"):
        engine.encode_step()
    out = ffi.new("int32_t *")
    assert lib.mllama_context_encode_step(ctx, 1, out) == lib.MLLAMA_ERR_INVALID_ARGUMENT  # none under way
    assert lib.mllama_context_encode_step(ctx, 1, ffi.NULL) == lib.MLLAMA_ERR_INVALID_ARGUMENT
    assert lib.mllama_context_encode_cancel(ffi.NULL) == lib.MLLAMA_ERR_INVALID_ARGUMENT
    pixels = np.ascontiguousarray(image.pixel_values, np.float32)
    buf = ffi.from_buffer("float[]", pixels)
    for slot, n_pixels, ar_id, n_tiles, reason in [(2, pixels.size, image.aspect_ratio_id, 1, "out of range"),
                                                   (0, pixels.size - 1, image.aspect_ratio_id, 1, "pixel values"),
                                                   (0, pixels.size, 99, 1, "aspect ratio id"),
                                                   (0, pixels.size, image.aspect_ratio_id, 3, "tiles")]:
        assert lib.mllama_context_encode_begin(ctx, slot, buf, n_pixels, ar_id, n_tiles, out) == \
            lib.MLLAMA_ERR_INVALID_ARGUMENT
        assert reason in ffi.string(lib.mllama_last_error()).decode()
    assert lib.mllama_context_encode_begin(ctx, 0, buf, pixels.size, image.aspect_ratio_id, 1, ffi.NULL) == \
        lib.MLLAMA_ERR_INVALID_ARGUMENT


def test_an_unfinished_encode_holds_nothing_and_ends_when_its_slot_is_rewritten(model):
    engine = model.engine
    images = model.prepare_images([picture(SIZES["1 tile"], seed=8), picture(SIZES["4 tiles"], seed=9)])
    engine.encode(0, images[0])
    blob = bytes(get_slot_state(model._ctx, 0))
    assert engine.begin_encode(0, images[1]) == n_stages(model) and engine.encode_step(2) > 0
    with pytest.raises(ValueError, match="image slot 0 holds no image"):  # a decode reading it is refused
        engine.decode([mllama.generation.engine.Part(0, [BOS, IMAGE], 0, [0], np.array([[0], [1]], np.uint8), [1])])
    with pytest.raises(ValueError, match="holds no image"):
        get_slot_state(model._ctx, 0)
    model.encode_pixels(images[0].pixel_values, images[0].aspect_ratio_id, images[0].n_tiles, slot=0)
    assert bytes(get_slot_state(model._ctx, 0)) == blob  # the whole encode replaced it ...
    with pytest.raises(ValueError, match="no image encode in steps"):  # ... and ended the one in steps
        engine.encode_step()
    assert engine.encoding is None
    assert engine.begin_encode(1, images[1]) > 0 and engine.encode_step(1) > 0
    engine.cancel_encode()
    assert engine.encoding is None and engine.slot_keys[1] is None
    with pytest.raises(ValueError, match="holds no image"):
        get_slot_state(model._ctx, 1)
    out = ffi.new("int32_t *")
    assert lib.mllama_context_encode_step(model._ctx, 0, out) == lib.MLLAMA_ERR_INVALID_ARGUMENT


def test_streams_go_on_while_a_new_image_is_encoded(model):
    """A request with a new image arrives while another streams: the stream gets a token at every step of the
    encode (one vision stage per step), and both answers equal those of the same requests alone."""
    text = model.tokenize
    image = model.prepare_images([picture(SIZES["4 tiles"], seed=10)])[0]
    story = [BOS] + text("Tell me a long story about the sea.")
    describe = [BOS, IMAGE] + text("Describe it.")
    model.engine.slot_keys[:] = [None, None]
    alone = [model.generate(story, stream=False, temperature=0.0, max_tokens=40),
             model.generate(describe, [image], stream=False, temperature=0.0, max_tokens=6)]
    model.engine.slot_keys[:] = [None, None]  # the image is new again
    scheduler = model.scheduler
    first = model.submit(story, temperature=0.0, max_tokens=40)
    model.run_step()
    second = model.submit(describe, [image], temperature=0.0, max_tokens=6)
    stages, tokens_before = scheduler.stats["encode_steps"], scheduler.stats["generated_tokens"]
    model.run_step()  # admitted: its image waits for the tower
    assert second.to_encode and second.in_prefill and first.streams[0].record.completion_tokens > 0
    assert scheduler.n_encoding == 1
    while second.to_encode:
        model.run_step()
    assert scheduler.n_encoding == 0
    stepped = scheduler.stats["encode_steps"] - stages
    assert stepped == n_stages(model)  # one stage a step ...
    assert scheduler.stats["generated_tokens"] - tokens_before >= min(stepped, 40 - 2)  # ... a token each
    together = [r[0].text for r in model.results([first, second])]
    assert together == alone


def test_a_request_cancelled_or_failing_in_its_encode_frees_what_it_held(model, monkeypatch):
    text, engine, scheduler = model.tokenize, model.engine, model.scheduler
    images = model.prepare_images([picture(SIZES["4 tiles"], seed=11), picture(SIZES["1 tile"], seed=12)])
    engine.slot_keys[:] = [None, None]
    stream = model.submit([BOS] + text("Go on and on."), temperature=0.0, max_tokens=30)
    leaving = model.submit([BOS, IMAGE] + text("Describe it."), images[:1], temperature=0.0, max_tokens=4)
    model.run_step()
    model.run_step()
    slot = leaving.slots[0]
    assert engine.encoding == (slot, images[0]) and engine.slot_refs[slot] == 1
    scheduler.cancel(leaving)
    model.run_step()
    assert engine.encoding is None and engine.slot_refs[slot] == 0 and engine.slot_keys[slot] is None
    assert isinstance(leaving.streams[0].events[-1][1], mllama.GenerationCancelled)

    def broken(self, n_stages=1):
        raise mllama.MllamaError("the device failed")

    failing = model.submit([BOS, IMAGE] + text("Describe it."), images[1:], temperature=0.0, max_tokens=4)
    monkeypatch.setattr(type(engine), "encode_step", broken)
    model.run_step()
    kind, error = failing.streams[0].events[-1]
    assert kind == "error" and "the device failed" in str(error) and not any(engine.slot_refs)
    monkeypatch.undo()
    engine.cancel_encode()
    assert not stream.streams[0].done  # the other stream went on through both
    result = model.results([stream])[0][0]
    assert result.finish_reason == "length" and result.usage.completion_tokens == 30 and scheduler.running == []


def test_a_request_failing_to_start_gives_back_the_slot_it_emptied(model, monkeypatch):
    """A request claims the least recently used slot for its new image, then fails to start: the slot holds again
    the image it held, whose next request reads it there (the slot had been left empty, and that image was encoded
    again)."""
    text, engine, scheduler = model.tokenize, model.engine, model.scheduler
    images = model.prepare_images([picture(SIZES["1 tile"], seed=seed) for seed in (21, 22, 23)])
    prompt = [BOS, IMAGE] + text("Describe it.")
    engine.slot_keys[:] = [None, None]
    for image in images[:2]:
        model.generate(prompt, [image], stream=False, temperature=0.0, max_tokens=1)
    keys = list(engine.slot_keys)
    assert sorted(keys) == sorted(image.key for image in images[:2])

    def broken(self, *args, **kwargs):
        raise mllama.MllamaError("no room")

    monkeypatch.setattr(type(engine), "start", broken)
    failing = model.submit(prompt, images[2:], temperature=0.0, max_tokens=4)
    model.run_step()
    kind, error = failing.streams[0].events[-1]
    assert kind == "error" and "no room" in str(error)
    monkeypatch.undo()
    assert engine.slot_keys == keys and not any(engine.slot_refs) and not any(engine.slot_pending)
    encoded, hits = engine.n_encoded, scheduler.stats["image_slot_hits"]
    model.generate(prompt, images[:1], stream=False, temperature=0.0, max_tokens=1)
    assert engine.n_encoded == encoded and scheduler.stats["image_slot_hits"] == hits + 1


@pytest.mark.parametrize("cancel_first", [False, True])
def test_the_same_new_image_in_two_requests_is_encoded_once(model, cancel_first):
    """Two requests with the same new image share one slot and one encode (it had run once per request, the
    second into a slot of its own); the first cancelled halfway through, the encode goes on for the second."""
    text, engine, scheduler = model.tokenize, model.engine, model.scheduler
    image = model.prepare_images([picture(SIZES["4 tiles"], seed=13)])[0]
    prompts = [[BOS, IMAGE] + text("Describe it."), [BOS, IMAGE] + text("What colour is it?")]
    alone = []
    for prompt in prompts:
        engine.slot_keys[:] = [None, None]
        alone.append(model.generate(prompt, [image], stream=False, temperature=0.0, max_tokens=5))
    engine.slot_keys[:] = [None, None]
    encoded, stages = engine.n_encoded, scheduler.stats["encode_steps"]
    first, second = (model.submit(prompt, [image], temperature=0.0, max_tokens=5) for prompt in prompts)
    model.run_step()
    assert first.slots == second.slots and engine.slot_refs[first.slots[0]] == 2
    if cancel_first:
        model.run_step()
        assert engine.encoding == (first.slots[0], image)
        scheduler.cancel(first)
    results = model.results([second] if cancel_first else [first, second])
    assert engine.n_encoded - encoded == 1 and scheduler.stats["encode_steps"] - stages == n_stages(model)
    assert [r[0].text for r in results] == (alone[1:] if cancel_first else alone)
    assert not any(engine.slot_refs) and engine.slot_keys.count(image.key) == 1


def test_a_shared_encode_goes_on_before_another_image_begins(gguf_f32):
    """The request that began an encode is cancelled; of the requests still running, one awaits another image and
    comes first, one shares the encode under way: the encode goes on for the sharer (beginning the other image had
    dropped its stages, and a later request with the first image encoded it into a slot of its own)."""
    with mllama.Model(gguf_f32, n_image_slots=3, image_cache_bytes=0, n_seq_max=4, n_ctx=256) as model:
        engine, scheduler = model.engine, model.scheduler
        x, y = model.prepare_images([picture(SIZES["4 tiles"], seed=14), picture(SIZES["1 tile"], seed=15)])
        prompt = [BOS, IMAGE] + model.tokenize("Describe it.")
        alone = {im.key: model.generate(prompt, [im], stream=False, temperature=0.0, max_tokens=4) for im in (x, y)}
        engine.slot_keys[:] = [None, None, None]
        encoded, stages = engine.n_encoded, scheduler.stats["encode_steps"]
        starter = model.submit(prompt, [x], temperature=0.0, max_tokens=4)
        for _ in range(3):
            model.run_step()
        other, sharer = (model.submit(prompt, [im], temperature=0.0, max_tokens=4) for im in (y, x))
        model.run_step()
        assert sharer.slots == starter.slots and other.slots != starter.slots
        scheduler.cancel(starter)
        model.run_step()
        later = model.submit(prompt, [x], temperature=0.0, max_tokens=4)
        model.run_step()
        assert later.slots == sharer.slots  # it shares the encode still under way
        results = model.results([other, sharer, later])
        assert [r[0].text for r in results] == [alone[y.key], alone[x.key], alone[x.key]]
        assert engine.n_encoded - encoded == 2  # x once, y once
        assert scheduler.stats["encode_steps"] - stages == 2 * n_stages(model)
