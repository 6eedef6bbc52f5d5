"""Sampling functions (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from mllama.generation.sampling import (SamplingParams, apply_penalties, descending_order, find_stop, probabilities,
                                        sample)


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


def test_a_penalty_past_float32_is_held_at_its_largest():
    """A repeat penalty of 1e-40 divides a positive logit past float32: it had become inf, and the softmax NaN
    (numpy's "probabilities contain NaN" mid-stream)."""
    logits = np.array([20.0, 5.0, -3.0], np.float32)
    p = SamplingParams(repeat_penalty=1e-40, temperature=1.0, top_p=1.0)
    out = apply_penalties(logits, [0, 1, 2], p)
    largest = np.finfo(np.float32).max
    assert out[:2].tolist() == [largest, largest] and -1e-39 < out[2] < 0  # (the last a float32 subnormal)
    ids, probs = probabilities(out, p)
    assert sorted(ids[:2].tolist()) == [0, 1] and np.allclose(probs[:2], 0.5) and not np.isnan(probs).any()


def test_numpy_scalars_are_taken_as_python_numbers():
    """A numpy seed had passed the checks, then overflowed when a choice's seed was derived ((seed + i) % 2**64)."""
    p = SamplingParams(seed=np.uint64(2**63), top_k=np.int32(5), temperature=np.float32(0.5))
    assert (type(p.seed), type(p.top_k), type(p.temperature)) == (int, int, float)
    assert (p.seed + 1) % 2**64 == 2**63 + 1


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


def reference_probabilities(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The definition, with every candidate sorted (as the first version computed it)."""
    values = logits.astype(np.float64)
    ids = np.argsort(-values, kind="stable")
    if p.top_k and 0 < p.top_k < len(values):
        ids = ids[: p.top_k]
    scaled = values[ids] / max(p.temperature, 1e-6)
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        ids, probs = ids[:cut], probs[:cut]
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        ids, probs = ids[keep], probs[keep]
    return ids, probs / probs.sum()


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat (a deep top-p cut: the whole sort) to peaked (top 256)
@pytest.mark.parametrize("params", [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_p=0.99),
                                    dict(temperature=0.6, top_p=1.0, min_p=0.05), dict(temperature=1.5, top_p=1.0),
                                    dict(temperature=0.7, top_k=40, top_p=0.9),
                                    dict(temperature=1.0, top_k=300, top_p=0.5)])
def test_probabilities_match_the_full_sort(scale, params):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(128256) * scale).astype(np.float32)
    logits[::7] = np.round(logits[::7])  # ties, broken by the lower id
    logits[:1000:3] = -0.0
    p = SamplingParams(**params)
    ids, probs = probabilities(logits, p)
    ref_ids, ref_probs = reference_probabilities(logits, p)
    assert ids.tolist() == ref_ids.tolist()
    # the normalizer is summed in another order: at most n float64 roundings apart (128256 * 2^-53 < 1e-10)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-10, atol=0)


def test_descending_order_is_a_stable_sort():
    logits = np.array([1.0, -0.0, 0.0, np.inf, -np.inf, -1.5, 1.0, 3e38, -3e38, 1e-45, -1e-45, 0.0], np.float32)
    assert descending_order(logits).tolist() == np.argsort(-logits, kind="stable").tolist()
    many = np.round(np.random.default_rng(2).standard_normal(50000) * 4).astype(np.float32)
    assert descending_order(many).tolist() == np.argsort(-many, kind="stable").tolist()


def test_sampling_without_cuts_draws_the_softmax():
    logits = np.log(np.array([0.5, 0.2, 0.2, 0.1])).astype(np.float32)
    rng = np.random.default_rng(3)
    n = 40000
    freq = np.bincount([sample(logits, [], SamplingParams(temperature=1.0, top_p=1.0), rng) for _ in range(n)],
                       minlength=4) / n
    # within 5 standard deviations of a binomial count (sqrt(0.25 / 40000) = 0.0025)
    np.testing.assert_allclose(freq, [0.5, 0.2, 0.2, 0.1], atol=5 * 0.0025)
