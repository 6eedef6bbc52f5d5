"""Sampling functions (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from mllama.generation.sampling import SamplingParams, apply_penalties, find_stop, probabilities, sample


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert sample(logits, [], SamplingParams(temperature=0.0), np.random.default_rng(0)) == 1


def test_top_k_top_p_min_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float64)).astype(np.float32)
    ids, probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0))
    assert list(ids) == [0, 1, 2] and np.isclose(probs.sum(), 1.0)
    ids, _ = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert list(ids) == [0, 1]
    ids, _ = probabilities(logits, SamplingParams(temperature=1.0, top_p=1.0, min_p=0.5))
    assert list(ids) == [0, 1]


def test_temperature_sharpens():
    logits = np.array([1.0, 0.0], np.float32)
    _, hot = probabilities(logits, SamplingParams(temperature=2.0, top_p=1.0))
    _, cold = probabilities(logits, SamplingParams(temperature=0.5, top_p=1.0))
    assert cold[0] > hot[0] > 0.5


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    a = [sample(logits, [], p, np.random.default_rng(7)) for _ in range(20)]
    b = [sample(logits, [], p, np.random.default_rng(7)) for _ in range(20)]
    assert a == b


def test_penalties():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = apply_penalties(logits, [0, 1, 0], SamplingParams(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    assert np.allclose(out, [2.0 / 2 - 0.5 - 0.5, -2.0 * 2 - 0.5 - 0.25, 1.0])


def test_stop_strings():
    assert find_stop("hello world", ["wor"]) == (6, 0)
    assert find_stop("hello wo", ["world"]) == (-1, 2)
    assert find_stop("abc", []) == (-1, 0)


def test_unknown_option():
    with pytest.raises(TypeError, match="unknown sampling option"):
        SamplingParams().with_overrides(temprature=1.0)
    assert SamplingParams().with_overrides(stop="x").stop == ("x",)


def test_allowed_mask_applies_to_greedy_and_to_sampling():
    logits = np.array([5.0, 1.0, 4.0, 0.5, 3.0], np.float32)
    allowed = np.array([False, True, False, True, True])
    assert sample(logits, [], SamplingParams(temperature=0.0), np.random.default_rng(0), allowed) == 4
    hot = SamplingParams(temperature=5.0, top_p=1.0, top_k=2, repeat_penalty=2.0)
    rng = np.random.default_rng(0)
    drawn = {sample(logits, [4, 4], hot, rng, allowed) for _ in range(300)}
    assert drawn == {1, 4}  # top-k after the mask: the penalized 4 (1.5) and 1 (1.0), never 3 or a refused id
