"""The asyncio API: achat / adescribe give what chat / describe give (whole and streamed), requests from
concurrent tasks are batched together and each equals its reply alone, the event loop keeps running while
they generate, and a cancelled task or a stream left early stops its request (its sequence freed)."""

from __future__ import annotations

import asyncio
import gc
import io

import numpy as np
import pytest
from PIL import Image

import mllama

A = [{"role": "user", "content": "Tell me about lighthouses."}]
B = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=512, n_seq_max=2) as m:
        yield m


def png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def content(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def test_achat_and_adescribe_equal_chat_and_describe(model):
    expected = [content(model.chat(m, **GREEDY)) for m in (A, B)]
    described = model.describe(png(), **GREEDY)
    sync_chunks = list(model.chat(A, stream=True, **GREEDY))

    async def main():
        replies = await asyncio.gather(model.achat(A, **GREEDY), model.achat(B, **GREEDY),
                                       model.adescribe(png(), **GREEDY))
        stream = await model.achat(A, stream=True, **GREEDY)
        return replies, [chunk async for chunk in stream]

    (a, b, image), chunks = asyncio.run(main())
    assert [content(a), content(b), image] == [*expected, described]
    assert a["usage"] == model.chat(A, **GREEDY)["usage"]
    drop = ("id", "created")
    assert [{k: v for k, v in c.items() if k not in drop} for c in chunks] == \
        [{k: v for k, v in c.items() if k not in drop} for c in sync_chunks]


def test_the_event_loop_runs_while_requests_generate(model):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        clock = asyncio.create_task(ticker())
        steps = model.scheduler.stats["steps"]
        await asyncio.gather(*(model.achat(m, **GREEDY) for m in (A, B, A)))
        clock.cancel()
        return ticks, model.scheduler.stats["steps"] - steps

    ticks, steps = asyncio.run(main())
    assert steps >= 12 and ticks >= steps // 2  # the loop ran between the steps, not only before and after


def test_a_cancelled_task_or_a_stream_left_early_stops_its_request(model):
    long = {"temperature": 0, "max_tokens": 400}

    async def main():
        task = asyncio.create_task(model.achat(A, **long))
        while model.scheduler.stats["generated_tokens"] == generated:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after_cancel = content(await model.achat(B, **GREEDY))
        stream = await model.achat(A, stream=True, **long)
        async for _ in stream:
            break
        await stream.aclose()
        return after_cancel, content(await model.achat(B, **GREEDY))

    expected = content(model.chat(B, **GREEDY))
    generated = before = model.scheduler.stats["generated_tokens"]
    assert asyncio.run(main()) == (expected, expected)
    assert model.scheduler.stats["generated_tokens"] - before < 200  # neither ran to its 400 tokens
    assert model.scheduler.running == [] and not any(model.scheduler.busy)


def test_a_stream_dropped_before_it_is_read_stops_its_request(model):
    """An async generator never started runs no `finally`: the stream's finalizer stops its request."""
    long = {"temperature": 0, "max_tokens": 400}
    expected = content(model.chat(B, **GREEDY))
    before = model.scheduler.stats["generated_tokens"]

    async def main():
        stream = await model.achat(A, stream=True, **long)  # queued, never iterated
        del stream
        gc.collect()
        return content(await model.achat(B, **GREEDY))

    assert asyncio.run(main()) == expected
    assert model.scheduler.stats["generated_tokens"] - before < 200  # the dropped one did not run to 400 tokens
    assert model.scheduler.running == [] and not any(model.scheduler.busy)


def test_describe_and_adescribe_stream_the_description(model):
    whole = model.describe(png(), **GREEDY)
    pieces = list(model.describe(png(), stream=True, **GREEDY))

    async def main():
        return [piece async for piece in await model.adescribe(png(), stream=True, **GREEDY)]

    assert len(pieces) > 1 and "".join(pieces) == whole
    assert asyncio.run(main()) == pieces
    with pytest.raises(TypeError, match="describe gives one description"):
        model.describe(png(), n=2)



def test_a_cancelled_request_leaves_no_sequence_or_slot_busy(gguf_f32):
    """forward() and encode_image() right after a request was cancelled (an achat task cancelled does that, and no
    step may follow): its sequence and image slot had stayed busy ("every sequence is busy") until a step ran."""
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    with mllama.Model(gguf_f32, n_ctx=256, n_image_slots=1) as model:
        tokens, images = model.chat_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                                         {"type": "text", "text": "hi"}]}])
        request = model.submit(tokens, images, temperature=0, max_tokens=200)
        while model.scheduler.stats["generated_tokens"] < 3:
            model.run_step()
        model.scheduler.cancel(request)  # (what the async API does when its task is cancelled: no step after)
        assert model.forward(model.tokenize("<|begin_of_text|>hello", special=True)).shape[0] == 2
        assert model.encode_image(image).shape[0] == model.hparams.v_max_tiles
        assert not any(model.scheduler.busy) and model.engine.slot_refs == [0]
