"""CI-sized GGUF fuzzing (tests/fuzz/gguf_fuzz.py runs the long campaign): every mutated file
ends in ModelLoadError or loads; no crash, hang, other exception or memory blow-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

from corpus import shrink  # noqa: E402
from gguf_fuzz import fuzz  # noqa: E402


@pytest.fixture(scope="module")
def corpus(small_gguf, tmp_path_factory, hf_dir, hf_weights):
    import json

    from ollama_writer import write_era_b

    folder = tmp_path_factory.mktemp("corpus")
    ours = shrink(small_gguf, folder / "ours.gguf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    era_b = write_era_b(folder / "era_b_full.gguf", hf_weights, cfg, None)
    ollama = shrink(era_b, folder / "ollama.gguf")
    era_b.unlink()
    return [ours, ollama]


def test_corpus_files_load(corpus):
    import mllama

    for path in corpus:
        assert path.stat().st_size < 4_000_000
        with mllama.Model(path, n_ctx=64) as model:
            assert model.hparams.n_vocab == 300


def test_mutated_files_never_crash(corpus):
    result = fuzz(corpus, cases=2000, seed=12345, timeout=30.0)
    assert result["failures"] == [], result["failures"][:5]
    assert result["error"] > 500 and result["ok"] > 100  # both outcomes are exercised
