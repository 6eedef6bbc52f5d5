"""Several sequences in one context: a sequence's logits in a mixed batch equal its logits alone (F32
weights: NMSE <= 1e-6, the same greedy token), prefix copy and trim, the batch's argument checks, and
the scheduler's results (chat_many, n > 1, prefix reuse) against the same requests run alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama._native.ffi import call, ffi, lib
from mllama.generation.engine import Part

BOS, IMAGE = 128000, 128256


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_seq_max=4, n_image_slots=4, n_ctx=512) as m:
        yield m


@pytest.fixture(scope="module")
def images(model):
    return model.prepare_images([picture(50, 50, 1), picture(100, 40, 2), picture(40, 150, 3)])


def prompts(model):
    text = model.tokenize
    return {  # seq -> (tokens, image indices)
        0: ([BOS, IMAGE] + text("A long prompt in prefill next to three decoding sequences, with its own image."), [0]),
        1: ([BOS, IMAGE] + text("Decoding with the second image."), [1]),
        2: ([BOS] + text("Decoding without any image at all."), []),
        3: ([BOS] + text("Text first, then") + [IMAGE] + text("the third image."), [2]),
    }


def mixed_batch_against_alone(model, images, order, prefill):
    """Sequences `order` in one batch, in that order: `prefill` with its whole prompt, the others decoding their
    last prompt token; each part's logits against its sequence evaluated alone."""
    engine, cases = model.engine, prompts(model)
    alone = {seq: engine.evaluate(cases[seq][0], [images[i] for i in cases[seq][1]], all_logits=True) for seq in order}
    parts = []
    for seq in order:
        toks, imgs = cases[seq]
        seq_images = [images[i] for i in imgs]
        slots = engine.claim_slots(seq_images)
        engine.start(seq, toks, seq_images, slots, reuse=False)
        if seq != prefill:  # decoding: the prompt but its last token first, alone
            head = toks[:-1]
            engine.decode([Part(seq, head, 0, slots, engine.rows_for(seq, head), [])])
        first = 0 if seq == prefill else len(toks) - 1
        rest = toks[first:]
        parts.append(Part(seq, rest, first, slots, engine.rows_for(seq, rest), list(range(len(rest)))))
    batched = engine.decode(parts)
    row = 0
    for p in parts:
        got, want = batched[row:row + len(p.outputs)], alone[p.seq][p.n_past:]
        row += len(p.outputs)
        assert nmse(got, want) <= 1e-6, p.seq
        assert (got.argmax(-1) == want.argmax(-1)).all(), p.seq
    for p in parts:
        engine.release_slots(p.slots)
    assert engine.slot_refs == [0] * engine.n_slots
    return batched


def test_mixed_batch_equals_each_sequence_alone(model, images):
    mixed_batch_against_alone(model, images, [0, 1, 2, 3], prefill=0)


def test_mixed_batch_over_f16_image_caches(gguf_f32, monkeypatch):
    """F16 image caches: head-major where our cross-attention kernel's AVX2 form reads them (runtime/context.h), a
    batch's view over several slots striding each head's keys (graph/cross_kv.h); key-major under ggml's attention.
    Each sequence in the batch equals itself alone, and the two layouts give the same logits (F16 caches: our F32
    queries against ggml's F16-rounded ones, NMSE <= 1e-5 as tests/test_cpu_kernels.py's decode check)."""
    monkeypatch.setenv("MLLAMA_AVX512", "0")  # the AVX2 form wherever our kernels run
    layouts, logits = {}, {}
    for kernels in ("1", "attn,gemm,gelu,qmm,amx,fuse"):  # every kernel, then every kernel but xattn
        with mllama.Model(gguf_f32, n_seq_max=4, n_image_slots=4, n_ctx=512, cross_kv_f32=False,
                          cpu_kernels=kernels) as m:
            layouts[kernels] = m.op_paths()["cross-attention"]
            images = m.prepare_images([picture(50, 50, 1), picture(100, 40, 2), picture(40, 150, 3)])
            logits[kernels] = mixed_batch_against_alone(m, images, [1, 3, 0, 2], prefill=0)
    ours, plain = "1", "attn,gemm,gelu,qmm,amx,fuse"
    assert "head-major" not in layouts[plain] and layouts[plain].startswith("ggml")
    if not layouts[ours].startswith("mllama"):
        pytest.skip("no AVX2 kernels on this CPU: both contexts run ggml's attention over key-major caches")
    assert "head-major" in layouts[ours]
    assert 0 < nmse(logits[ours], logits[plain]) <= 1e-5


def steps_of(m, prompts, fed, grouped):
    """Each prompt prefilled (sequence i), then the tokens of `fed` decoded one a step, all sequences in one batch
    (grouped) or each alone; every logit row, prompt after prompt then step after step."""
    engine, out = m.engine, []
    for seq, toks in enumerate(prompts):
        engine.start(seq, toks, [], [], reuse=False)
        out.append(engine.decode([Part(seq, toks, 0, [], engine.rows_for(seq, toks), list(range(len(toks))))]))
    for step in fed:
        parts = [Part(seq, [tok], len(engine.seqs[seq].tokens), [], engine.rows_for(seq, [tok]), [0])
                 for seq, tok in enumerate(step)]
        out += [engine.decode(parts)] if grouped else [engine.decode([p]) for p in parts]
    return np.concatenate(out)


def test_self_attention_kernel_over_long_caches(gguf_f32):
    """Our attention kernel over the self-attention caches (F16; graph/decoder.cpp's kernel_attention), where the CPU
    kernels may run: prompts of 70, 200 and 333 tokens (one 64-key block and more, each ending inside a block), each
    prefilled, then 3 steps of the three in one decode group (each row reading its own sequence's cells) and of each
    alone. The group equals the steps alone (NMSE <= 1e-6), and both equal ggml's flash attention (every kernel but
    xattn) within the F16 caches' bound of tests/test_cpu_kernels.py's decode check (NMSE <= 1e-5: our F32 queries
    against ggml's F16-rounded ones)."""
    rng = np.random.default_rng(7)
    prompts = [[BOS] + rng.integers(1000, 100000, n - 1).tolist() for n in (70, 200, 333)]
    fed = rng.integers(1000, 100000, (3, 3)).tolist()  # the same tokens in every context: no drift from argmax ties
    paths, logits = {}, {}
    for name, kernels, grouped in (("group", "1", True), ("alone", "1", False),
                                   ("ggml", "attn,gemm,gelu,qmm,amx,fuse", True)):
        with mllama.Model(gguf_f32, n_seq_max=3, n_ctx=400, kv_f32=False, cpu_kernels=kernels) as m:
            paths[name] = m.op_paths()["self-attention"]
            logits[name] = steps_of(m, prompts, fed, grouped)
    assert paths["ggml"].startswith("ggml")
    if not paths["group"].startswith("mllama"):
        pytest.skip("no x86 kernels on this CPU: every context runs ggml's attention")
    assert nmse(logits["group"], logits["alone"]) <= 1e-6
    assert 0 < nmse(logits["group"], logits["ggml"]) <= 1e-5


# Decoding parts attend in groups (consecutive one-token parts whose sequence ids go up in even steps, one attention
# over a strided view of their caches): groups of steps 1 and 2, ids that go down (a new group), a prefill part
# between two groups, a group of one.
@pytest.mark.parametrize("order, prefill", [([1, 2, 3, 0], 0), ([3, 1, 2], None), ([0, 2, 3], None),
                                            ([1, 3, 0, 2], 0), ([2], None), ([3, 2, 1, 0], None)])
def test_decode_groups_equal_each_sequence_alone(model, images, order, prefill):
    mixed_batch_against_alone(model, images, order, prefill)


@pytest.mark.parametrize("kv_f32", [True, False])  # F16 caches: head-major where our kernel's AVX2 form reads them
def test_prefix_copy_trim_and_lengths(gguf_f32, kv_f32):
    with mllama.Model(gguf_f32, n_seq_max=4, n_image_slots=4, n_ctx=512, kv_f32=kv_f32) as model:
        engine = model.engine
        images = model.prepare_images([picture(50, 50, 1)])
        toks = [BOS, IMAGE] + model.tokenize("Shared prompt for two choices.")
        slots = engine.claim_slots(images)
        engine.start(0, toks, images, slots, reuse=False)
        engine.decode([Part(0, toks, 0, slots, engine.rows_for(0, toks), [])])
        engine.copy_sequence(0, 1)
        assert engine.length(1) == len(toks) and engine.seqs[1].tokens == toks
        nxt = model.tokenize(" next")[0]
        both = engine.decode([Part(s, [nxt], len(toks), slots, engine.rows_for(s, [nxt]), [0]) for s in (0, 1)])
        np.testing.assert_array_equal(both[0], both[1])  # the same cells, the same arithmetic
        call(lib.mllama_context_seq_trim, engine.ctx, 1, 3)
        assert engine.length(1) == 3 and engine.length(0) == len(toks) + 1
        engine.release_slots(slots)


@pytest.mark.parametrize("seqs, message", [
    ([(0, 0, 1), (0, 1, 1)], "sequence 0 has two parts in one batch"),
    ([(7, 0, 1)], r"sequence id 7 out of range \[0, 4\)"),
    ([(2, 99, 1)], "sequence 2 holds .* positions: cannot evaluate from position 99"),
    ([(1, 0, 0)], "a part needs at least one token"),
])
def test_bad_batches_raise(model, seqs, message):
    model.engine.seqs[2].tokens = []
    call(lib.mllama_context_seq_trim, model.engine.ctx, 2, 0)
    parts = ffi.new("mllama_batch_seq[]", len(seqs))
    for c, (seq, n_past, n) in zip(parts, seqs):
        c.seq_id, c.n_past, c.n_tokens, c.n_images = seq, n_past, n, 0
    tokens = ffi.new("int32_t[]", [BOS] * 4)
    with pytest.raises(ValueError, match=message):
        call(lib.mllama_context_decode_batch, model.engine.ctx, tokens, parts, len(seqs), ffi.NULL, 0, ffi.NULL)
    for bad in ((0, 0), (-1, 0)):
        with pytest.raises(ValueError):
            call(lib.mllama_context_seq_copy, model.engine.ctx, bad[0], bad[1], 0)


def conversations():
    image = picture(60, 60, 4)
    return [[{"role": "user", "content": "Tell me a story about a lighthouse."}],
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}],
            [{"role": "user", "content": "Count to ten."}],
            [{"role": "user", "content": "Name three rivers."}],
            [{"role": "user", "content": [{"type": "image", "image": picture(30, 90, 5)},
                                          {"type": "text", "text": "What is this?"}]}]]


def test_chat_many_equals_each_chat_alone(model):
    convs = conversations()  # five requests on four sequences: one waits for a free sequence
    alone = [model.chat(c, temperature=0.0, max_tokens=8)["choices"][0]["message"]["content"] for c in convs]
    together = model.chat_many(convs, temperature=0.0, max_tokens=8)
    assert [r["choices"][0]["message"]["content"] for r in together] == alone
    assert model.scheduler.running == [] and not any(model.scheduler.busy)


def test_parallel_draws_equal_draws_in_line(gguf_f32):
    """Four sampled streams in one batch draw side by side on the scheduler's pool: the same tokens as drawing one
    after the other (two fresh models, so that both runs evaluate the same batches: a sampled reply in a batch
    may differ from the same request alone, whose logits differ by rounding)."""
    convs = conversations()[:4]
    replies = []
    for parallel in (True, False):
        with mllama.Model(gguf_f32, n_seq_max=4, n_ctx=512) as m:
            if not parallel:
                m.scheduler._draw_in_parallel = lambda jobs: {}
            out = m.chat_many(convs, temperature=1.0, top_p=0.9, seed=3, max_tokens=8)
            assert (m.scheduler._draw_pool is not None) == parallel
            replies.append([r["choices"][0]["message"]["content"] for r in out])
    assert replies[0] == replies[1] and len(set(replies[0])) == 4


def test_n_choices_share_the_prompt(model):
    conv = conversations()[1]
    greedy = model.chat(conv, n=3, temperature=0.0, max_tokens=6)
    texts = [c["message"]["content"] for c in greedy["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1 and [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    sampled = model.chat(conv, n=2, temperature=1.0, seed=11, max_tokens=6)
    first = model.chat(conv, temperature=1.0, seed=11, max_tokens=6)["choices"][0]["message"]["content"]
    assert sampled["choices"][0]["message"]["content"] == first  # choice k samples with seed + k
    assert sampled["usage"]["prompt_tokens"] == len(model.chat_prompt(conv)[0])
    assert 2 <= sampled["usage"]["completion_tokens"] <= 12  # both choices, at most 6 tokens each
    with pytest.raises(ValueError, match=r"n must be an integer within \[1, 4\]"):
        model.chat(conv, n=5)


def test_second_turn_reuses_the_first_turns_cache(model):
    conv = conversations()[1]
    first = model.chat(conv, temperature=0.0, max_tokens=6)
    before = model.scheduler.stats["prefix_tokens_reused"]
    decoded = model.n_decoded
    turn2 = conv + [first["choices"][0]["message"], {"role": "user", "content": "And the colours?"}]
    tokens, _ = model.chat_prompt(turn2)
    model.chat(turn2, temperature=0.0, max_tokens=1)
    reused = model.scheduler.stats["prefix_tokens_reused"] - before
    assert reused >= len(model.chat_prompt(conv)[0])  # at least the first prompt came from the cache
    assert model.n_decoded - decoded == len(tokens) - reused


def test_a_slot_read_by_a_running_request_is_not_overwritten(model, images):
    request = model.submit([BOS, IMAGE] + model.tokenize("Describe."), images[:1], temperature=0.0, max_tokens=50)
    model.run_step()  # admitted: its image is in a slot it holds
    slot = request.slots[0]
    with pytest.raises(mllama.MllamaError, match=f"image slot {slot} is read by a running generation"):
        model.encode_pixels(images[1].pixel_values, images[1].aspect_ratio_id, images[1].n_tiles, slot=slot)
    model.scheduler.cancel(request)
    model.run_step()
    assert model.engine.slot_refs[slot] == 0 and model.engine.slot_keys[slot] == images[0].key
    assert isinstance(request.streams[0].events[-1][1], mllama.GenerationCancelled)


def test_decoding_streams_batch_in_sequence_order(model):
    """The scheduler hands the engine its decoding streams in sequence order whatever order their requests run in
    (consecutive ids then attend as one group), each stream's part still paired with its own stream."""
    text = model.tokenize
    requests = [model.submit([BOS] + text(f"Stream {i} tells a story."), temperature=0.0, max_tokens=8)
                for i in range(3)]
    model.run_step()  # admission and prefill of all three
    scheduler = model.scheduler
    assert all(not r.in_prefill for r in requests) and len(scheduler.running) == 3
    scheduler.running.reverse()
    parts, owners = scheduler._batch()
    try:
        seqs = [p.seq for p in parts]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        assert all(stream.seq == part.seq for part, (_, stream) in zip(parts, owners))
    finally:
        scheduler._unbatch(parts, owners)
    for r in requests:
        scheduler.cancel(r)
    model.run_step()


def test_a_request_cancelled_while_waiting_leaves_the_queue_wherever_it_is(gguf_f32):
    """Behind a live waiting request it had kept its place (and the server's queue bound counted it) until it came
    first."""
    with mllama.Model(gguf_f32, n_seq_max=1, n_ctx=256) as m:
        text, scheduler = m.tokenize, m.scheduler
        running = m.submit([BOS] + text("One."), temperature=0.0, max_tokens=40)
        m.run_step()
        live = m.submit([BOS] + text("Two."), temperature=0.0, max_tokens=2)
        gone = m.submit([BOS] + text("Three."), temperature=0.0, max_tokens=2)
        scheduler.cancel(gone)
        m.run_step()
        assert list(scheduler.waiting) == [live] and scheduler.n_waiting == 1
        assert isinstance(gone.streams[0].events[-1][1], mllama.GenerationCancelled)
        scheduler.cancel(running)
        assert m.results([live])[0][0].text == m.generate([BOS] + text("Two."), stream=False, temperature=0.0,
                                                            max_tokens=2)


def test_text_requests_go_past_one_waiting_for_an_image_slot(gguf_f32):
    """With every image slot read by a running request, a request with a new image waits in its place, and a
    text-only request behind it starts on a free sequence (it had waited for the running request to end)."""
    with mllama.Model(gguf_f32, n_seq_max=3, n_image_slots=1, n_ctx=256) as m:
        text, scheduler = m.tokenize, m.scheduler
        pics = m.prepare_images([picture(50, 50, 1), picture(100, 40, 2)])
        first = m.submit([BOS, IMAGE] + text("Describe."), pics[:1], temperature=0.0, max_tokens=60)
        m.run_step()
        second = m.submit([BOS, IMAGE] + text("And this."), pics[1:], temperature=0.0, max_tokens=2)
        plain = m.submit([BOS] + text("Hello."), temperature=0.0, max_tokens=3)
        m.run_step()
        assert plain in scheduler.running and list(scheduler.waiting) == [second]
        later = m.submit([BOS, IMAGE] + text("Again."), pics[1:], temperature=0.0, max_tokens=2)
        m.run_step()
        assert list(scheduler.waiting) == [second, later]  # images never pass the one waiting for a slot
        assert m.results([plain])[0][0].text == m.generate([BOS] + text("Hello."), stream=False, temperature=0.0,
                                                             max_tokens=3)
        scheduler.cancel(first)
        assert [r[0].finish_reason for r in m.results([second, later])] == ["length", "length"]


def test_an_image_in_several_slots_does_not_block_a_request(gguf_f32):
    """Requests that started together with the same new image each encoded it into a slot of its own (they share
    one slot and one encode now); a request with that image and another then found no slot to evict (every copy was
    kept for it) and waited forever. Copies still arise (an encode into a chosen slot, engine.encode): one is kept."""
    with mllama.Model(gguf_f32, n_seq_max=4, n_image_slots=4, n_ctx=256, image_cache_bytes=0) as m:
        pics = m.prepare_images([picture(50, 50, 1), picture(100, 40, 2)])
        same = [m.submit([BOS, IMAGE] + m.tokenize(f"User {i}."), pics[:1], temperature=0.0, max_tokens=2)
                for i in range(4)]
        m.results(same)
        assert m.engine.slot_keys.count(pics[0].key) == 1 and m.engine.n_encoded == 1
        for slot in range(4):
            m.engine.encode(slot, pics[0])
        assert m.engine.slot_keys.count(pics[0].key) == 4
        both = m.submit([BOS, IMAGE, IMAGE] + m.tokenize("Both."), pics, temperature=0.0, max_tokens=2)
        for _ in range(200):
            m.run_step()
            if both.streams[0].done:
                break
        assert both.streams[0].done and both.streams[0].events[-1][0] == "result"
        assert sorted(m.engine.slot_keys).count(pics[0].key) == 3 and pics[1].key in m.engine.slot_keys
