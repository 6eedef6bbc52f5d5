"""Shared fixtures: a tiny random-weight Llama 3.2 Vision checkpoint with the real Llama 3
tokenizer (tests/fixtures/tiny_checkpoint.py), built once per test session, and its conversions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fixtures"))
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    from tiny_checkpoint import build_checkpoint

    out = tmp_path_factory.mktemp("hf") / "tiny-mllama"
    build_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="session")
def hf_weights(hf_dir) -> dict:
    """The checkpoint's tensors as float32 numpy arrays, by hub name."""
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def converted(hf_dir, tmp_path_factory):
    """convert(type) -> path, cached per type for the session."""
    import mllama

    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("gguf")

    def get(type_name: str) -> Path:
        if type_name not in cache:
            cache[type_name] = mllama.convert(hf_dir, folder / f"tiny-{type_name}.gguf", type=type_name)
        return cache[type_name]

    return get


@pytest.fixture(scope="session")
def gguf_f32(converted) -> Path:
    return converted("f32")


@pytest.fixture(scope="session")
def small_gguf(gguf_f32, tmp_path_factory) -> Path:
    """The f32 fixture without its 128K-token vocabulary: quick to rewrite, loads the same way."""
    from gguf_edit import rewrite

    tok = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template"}
    return rewrite(gguf_f32, tmp_path_factory.mktemp("small") / "small.gguf", drop_keys=tok)
