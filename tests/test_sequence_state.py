"""A sequence's bookkeeping (python/mllama/generation/engine.py's SequenceState): the positions of its <|image|>
tokens follow every change of its tokens (kept, extended, assigned), and the row/image table of the next tokens
(which image each row attends to, per slot column) equals transformers' own cross-attention token mask over the
whole sequence, computed from scratch each time."""

import random

import numpy as np
import pytest
from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

from mllama.generation.engine import SequenceState

IMAGE = 128256


def reference_table(tokens: list[int], n_past: int, n_slots: int) -> np.ndarray:
    """Rows n_past.. of tokens: 1 where the row attends to image m (m < n_slots), from transformers' mask."""
    table = np.zeros((len(tokens) - n_past, n_slots), dtype=np.uint8)
    for m, (start, end) in enumerate(get_cross_attention_token_mask(tokens, IMAGE)[:n_slots]):
        end = len(tokens) if end == -1 else end
        for pos in range(max(start, n_past), end):
            table[pos - n_past, m] = 1
    return table


def random_tokens(rng: random.Random, n: int) -> list[int]:
    """Text with <|image|> tokens now and then, some of them adjacent (a group that shares its end)."""
    return [IMAGE if rng.random() < 0.15 else rng.randrange(1000) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_row_tables_follow_every_change_of_the_tokens(seed):
    rng = random.Random(seed)
    state, expected = SequenceState(IMAGE, slots=[0, 1, 2]), []
    checked_images = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.5:  # a decode step or a prompt chunk
            new = random_tokens(rng, rng.choice([1, 1, 1, 2, 7]))
            state.extend(new)
            expected += new
        elif op < 0.8:  # a trim (a reused prefix, an interrupted batch)
            n = rng.randrange(len(expected) + 2)
            state.keep(n)
            expected = expected[:n]
        elif op < 0.9:  # a whole new history, as the benches set it
            expected = random_tokens(rng, rng.randrange(12))
            state.tokens = expected
        else:  # a sequence copied from this one
            state = SequenceState(IMAGE, state.tokens, state.image_keys, state.slots)
        assert state.tokens == expected
        assert state.image_locs == [i for i, t in enumerate(expected) if t == IMAGE]
        state.slots = list(range(rng.randrange(5)))  # fewer or more slot columns than images
        nxt = random_tokens(rng, rng.choice([1, 3]))
        table = state.rows_for(nxt)
        assert table.dtype == np.uint8 and table.shape == (len(nxt), len(state.slots))
        np.testing.assert_array_equal(table, reference_table(expected + nxt, len(expected), len(state.slots)))
        checked_images += int(table.any())
    assert checked_images > 50  # the tables checked were not all empty


def test_adjacent_images_share_the_later_ones_end():
    state = SequenceState(IMAGE, [5, IMAGE, IMAGE, 7, 8, IMAGE, 9], slots=[3, 4, 5])
    # rows 7, 8: both adjacent images stop where the third one starts, which the rows then attend to
    np.testing.assert_array_equal(state.rows_for([10, 11]), [[0, 0, 1], [0, 0, 1]])
    state.keep(5)  # the third image is gone: the first two run to the end again
    np.testing.assert_array_equal(state.rows_for([10]), [[1, 1, 0]])
    assert state.image_locs == [1, 2]
