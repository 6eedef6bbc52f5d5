"""The grammar mask off the critical path: the batch scheduler computes a constrained stream's next mask on
a worker thread while the decode runs (Scheduler.overlap_masks). Its output must be byte-identical to
the mask computed in line, greedy and sampled, and the masks must really come from the worker."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mllama
from mllama.generation.constrain import Grammar, GrammarState, GrammarVocabulary
from test_structured import ASK, schema_format

LARK = 'start: item ("," item)*\nitem: /[a-z]{1,8}/ | /[0-9]{1,4}/'


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=1024, n_seq_max=2) as m:
        yield m


@pytest.fixture
def mask_threads(monkeypatch) -> list[str]:
    """The name of the thread that computed each grammar mask."""
    names: list[str] = []
    compute = GrammarState._compute_mask

    def recorded(self):
        names.append(threading.current_thread().name)
        return compute(self)

    monkeypatch.setattr(GrammarState, "_compute_mask", recorded)
    return names


def constrained(model, overlap: bool, **request) -> list[tuple[bytes, str]]:
    """(text as UTF-8, finish_reason) of each choice of a constrained chat, with the masks overlapped or not."""
    model.scheduler.overlap_masks = overlap
    try:
        reply = model.chat(ASK, max_tokens=60, **request)
    finally:
        model.scheduler.overlap_masks = True
    return [(c["message"]["content"].encode(), c["finish_reason"]) for c in reply["choices"]]


SAMPLINGS = {"greedy": {"temperature": 0.0}, "seed7": {"temperature": 1.0, "seed": 7},
             "seed11": {"temperature": 1.0, "seed": 11}}
CONSTRAINTS = {"nested": {"response_format": schema_format("nested")},
               "array": {"response_format": schema_format("array")}, "lark": {"grammar": LARK}}


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS)
@pytest.mark.parametrize("constraint", CONSTRAINTS.values(), ids=CONSTRAINTS)
def test_overlapped_masks_give_the_same_output(model, mask_threads, sampling, constraint):
    """Two constrained choices decoded together (n=2): the same bytes with the masks in line and overlapped."""
    inline = constrained(model, False, n=2, **sampling, **constraint)
    assert mask_threads and all(name == threading.current_thread().name for name in mask_threads)
    mask_threads.clear()
    waited = model.scheduler.stats["grammar_masks"]
    overlapped = constrained(model, True, n=2, **sampling, **constraint)
    assert overlapped == inline
    assert mask_threads and all(name.startswith("mllama-grammar") for name in mask_threads)
    assert 0 < model.scheduler.stats["grammar_masks"] - waited <= len(mask_threads)  # some end uncollected
    if constraint is CONSTRAINTS["nested"] and sampling["temperature"] > 0:
        assert len(set(overlapped)) == 2  # two sampled choices, not one answer twice


def test_unconstrained_streams_start_no_mask(model, mask_threads):
    model.chat(ASK, max_tokens=4, temperature=0.0)
    assert mask_threads == []


def test_a_prefetched_mask_is_the_in_line_one_and_carries_its_errors(model):
    grammar = model.compile_grammar(response_format=schema_format("enum_numbers"))
    *tokens, last = model.tokenize('{"color": "red", "score": 0.25, "count": 3')
    inline, overlapped = grammar.start(), grammar.start()
    with ThreadPoolExecutor(1) as pool:
        for token in tokens:
            overlapped.prefetch(pool)
            assert np.array_equal(overlapped.allowed_tokens(), inline.allowed_tokens())
            inline.advance(token)
            overlapped.advance(token)
        overlapped.prefetch(pool)
        overlapped.advance(last)  # a mask started before a token is dropped by advance
        inline.advance(last)
        assert np.array_equal(overlapped.allowed_tokens(), inline.allowed_tokens())
        assert overlapped.is_accepting() is inline.is_accepting() is False
        wide = GrammarVocabulary(model.tokenizer, model.eog_ids, model.tokenizer.n_vocab,
                                 forbidden=[model.hparams.image_token_id])
        with pytest.raises(ValueError, match="admits no text this model can generate"):
            Grammar.lark(wide, "start: <|image|>")  # refused when compiled
        impossible = Grammar.lark(wide, 'start: "Hi" <|image|>').start()
        impossible.advance(model.tokenize("Hi")[0])
        impossible.prefetch(pool)
        with pytest.raises(ValueError, match="allows no token"):
            impossible.allowed_tokens()


def test_closing_the_model_stops_the_mask_thread(gguf_f32):
    def mask_threads_alive() -> int:
        return sum(t.name.startswith("mllama-grammar") for t in threading.enumerate())

    before = mask_threads_alive()
    with mllama.Model(gguf_f32, n_ctx=256) as m:
        m.chat(ASK, max_tokens=4, temperature=0.0, grammar=LARK)
        assert mask_threads_alive() == before + 1
    assert mask_threads_alive() == before
