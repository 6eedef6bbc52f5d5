"""Host bookkeeping of one decode step per stream at long contexts: the sequence's row/image table for the next
token (Engine.rows_for), then the evaluated token recorded (SequenceState.keep and extend), as Engine.decode does.
No model is needed: the figure is the Python work around a decode call, which must not grow with the context.

    python bench/bookkeeping.py [--steps 200]
"""

from __future__ import annotations

import argparse
import time

from mllama.generation.engine import Engine, SequenceState

IMAGE = 128256  # Llama 3.2 Vision's <|image|> id (any id works: the sequence is told which it is)


def per_step_ms(n_tokens: int, steps: int) -> float:
    engine = Engine.__new__(Engine)  # only the bookkeeping: no context behind it
    engine.image_token = IMAGE
    state = SequenceState(IMAGE, [1, IMAGE] + list(range(2, n_tokens)), slots=[0])
    engine.seqs = [state]
    t0 = time.perf_counter()
    for _ in range(steps):
        n_past = len(state.tokens)
        table = engine.rows_for(0, [5])
        state.keep(n_past)
        state.extend([5])
    assert table.tolist() == [[1]]  # the token after the image attends to it
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    for n in (1_000, 8_000, 32_000, 128_000):
        print(f"{n:>7} tokens: {per_step_ms(n, args.steps):.3f} ms per stream and step")


if __name__ == "__main__":
    main()
