"""Ollama's llama3.2-vision GGUF files (both generations), re-created from the tiny fixture by a
test-side writer (tests/ollama_writer.py), load and compute exactly like our own conversion; the
local Ollama store resolves by name and tag, read-only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mllama
from ollama_writer import tokenizer_fields, write_era_a, write_era_b


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 100, 3), dtype=np.uint8))
WITH_IMAGE = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe this image."}]}]
TEXT_ONLY = [{"role": "user", "content": "Tell me about lighthouses."}]


@pytest.fixture(scope="module")
def sources(hf_dir, hf_weights, gguf_f32):
    cfg = json.loads((hf_dir / "config.json").read_text())
    return hf_weights, cfg, tokenizer_fields(gguf_f32)


@pytest.fixture(scope="module")
def era_b(sources, tmp_path_factory):
    return write_era_b(tmp_path_factory.mktemp("ollama") / "era_b.gguf", *sources)


@pytest.fixture(scope="module")
def era_a(sources, tmp_path_factory):
    return write_era_a(tmp_path_factory.mktemp("ollama_a"), *sources)


@pytest.fixture(scope="module")
def ours(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=512) as model:
        yield model


def check_parity(model, ours_model):
    for messages in (WITH_IMAGE, TEXT_ONLY):
        tokens, images = ours_model.chat_prompt(messages)
        assert model.chat_prompt(messages)[0] == tokens  # same tokenizer and template
        greedy = list(ours_model.generate_tokens(tokens, images, temperature=0.0, max_tokens=64))
        assert list(model.generate_tokens(tokens, images, temperature=0.0, max_tokens=64)) == greedy
        full = tokens + greedy
        assert nmse(model.forward(full, images), ours_model.forward(full, images)) <= 1e-6


def test_era_b_single_file(era_b, ours):
    with mllama.Model(era_b, n_ctx=512) as model:
        assert model.info["format"] == 1
        assert len(model.tensors()) == len(ours.tensors()) + 2  # + rope_freqs and the tile-position gate
        check_parity(model, ours)


def test_era_a_text_and_projector(era_a, ours):
    text, projector = era_a
    with mllama.Model(text, projector=projector, n_ctx=512) as model:
        assert model.info["format"] == 2
        check_parity(model, ours)


def test_a_projector_named_alone_or_first_is_said_to_be_one(era_a):
    text, projector = era_a  # (alone: "missing metadata key 'mllama.vocab_size'"; first: "takes no projector file")
    with pytest.raises(mllama.ModelLoadError, match="is an Ollama vision projector: load its text model"):
        mllama.Model(projector)
    with pytest.raises(mllama.ModelLoadError, match="is an Ollama vision projector: name its text model first"):
        mllama.Model(projector, projector=text)


def test_the_cross_norm_permutation_matters(sources, tmp_path, ours):
    """Negative control: a file whose q_norm/k_norm WERE permuted too no longer matches, so the
    parity above really checks the inverse of Ollama's cross-attention permute."""
    path = write_era_b(tmp_path / "both_permuted.gguf", *sources, permute_norms=True)
    tokens, images = ours.chat_prompt(WITH_IMAGE)
    with mllama.Model(path, n_ctx=512) as model:
        assert nmse(model.forward(tokens, images), ours.forward(tokens, images)) > 1e-6


def test_quantized_era_b_follows_ollama_rules(sources, tmp_path, ours):
    path = write_era_b(tmp_path / "q8.gguf", *sources, quant="q8_0")
    with mllama.Model(path, n_ctx=512) as model:
        types = {t.name: t.type for t in model.tensors()}
        assert types["blk.0.attn_q.weight"] == "q8_0" and types["blk.1.cross_attn_q_proj.weight"] == "q8_0"
        assert types["v.blk.0.attn_q.weight"] == "f16" and types["mm.0.weight"] == "f16"
        assert types["v.tile_position_embd.weight"] == "f32"
        tokens, images = ours.chat_prompt(WITH_IMAGE)
        assert nmse(model.forward(tokens, images), ours.forward(tokens, images)) <= 3e-3


def test_info_names_the_format_and_conventions(era_b):
    proc = subprocess.run([sys.executable, "-m", "mllama", "info", str(era_b)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Ollama single file" in proc.stdout and "tanh" in proc.stdout and "CLIP mean/std" in proc.stdout


def make_store(root, files: dict[str, bytes | os.PathLike], name="llama3.2-vision", tag="11b", corrupt=False):
    """A fake Ollama store: blobs named by digest, a manifest for name:tag."""
    layers = []
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for media, src in files.items():
        data = open(src, "rb").read()
        digest = hashlib.sha256(data).hexdigest()
        blob = root / "blobs" / f"sha256-{digest}"
        shutil.copy(src, blob)
        if corrupt:
            with open(blob, "r+b") as f:
                f.seek(len(data) // 2)
                f.write(b"\xff\xff\xff\xff")
        layers.append({"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)})
    layers.append({"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00", "size": 1})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return root


def store_hashes(root) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_store_resolves_by_name_and_tag_read_only(era_b, era_a, tmp_path, monkeypatch):
    root = make_store(tmp_path / "models", {"application/vnd.ollama.image.model": era_b})
    make_store(root, {"application/vnd.ollama.image.model": era_a[0], "application/vnd.ollama.image.projector": era_a[1]}, tag="old")
    before = store_hashes(root)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with mllama.Model("ollama:llama3.2-vision:11b", n_ctx=256) as model:
        assert model.info["format"] == 1
        reply_new = model.describe(IMAGE, max_tokens=8, temperature=0.0)
    with mllama.Model("ollama:llama3.2-vision:old", n_ctx=256) as model:
        assert model.info["format"] == 2 and model.projector is not None
        assert model.describe(IMAGE, max_tokens=8, temperature=0.0) == reply_new
    IMAGE.save(tmp_path / "x.png")
    proc = subprocess.run([sys.executable, "-m", "mllama", "describe", "-m", "llama3.2-vision:11b", str(tmp_path / "x.png"),
                           "--max-tokens", "8", "--temperature", "0"], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert store_hashes(root) == before  # nothing in the store changed


def test_store_errors(era_b, tmp_path, monkeypatch):
    root = make_store(tmp_path / "models", {"application/vnd.ollama.image.model": era_b})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(mllama.ModelLoadError, match=r"'llama3.2-vision:90b' not found .*tags present: 11b"):
        mllama.Model("ollama:llama3.2-vision:90b")
    bad = make_store(tmp_path / "bad", {"application/vnd.ollama.image.model": era_b}, corrupt=True)
    monkeypatch.setenv("OLLAMA_MODELS", str(bad))
    with pytest.raises(mllama.ModelLoadError, match="does not match its digest"):
        mllama.Model("ollama:llama3.2-vision:11b")
    with pytest.raises(mllama.ModelLoadError, match="invalid Ollama model name"):  # no way out of the store
        mllama.Model("ollama:llama3.2-vision:../11b")
    manifest = next((bad / "manifests").rglob("11b"))
    for layers in ([1, 2], {"a": 1}):
        manifest.write_text(json.dumps({"layers": layers}))
        with pytest.raises(mllama.ModelLoadError, match="unreadable Ollama manifest .*not a list of objects"):
            mllama.Model("ollama:llama3.2-vision:11b")


def test_served_from_the_store_it_answers_to_its_ollama_name(era_b, tmp_path, monkeypatch):
    from openai import OpenAI
    from ollama import Client
    from test_server import running

    root = make_store(tmp_path / "models", {"application/vnd.ollama.image.model": era_b}, tag="latest")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with running("llama3.2-vision", "--ctx", "256", "--parallel", "1") as base:
        c = Client(host=base, timeout=120)
        assert [m.model for m in c.list().models] == ["llama3.2-vision:latest"]
        # listed as Ollama lists it: the manifest's sha256, every layer's bytes, the manifest's time
        manifest = root / "manifests" / "registry.ollama.ai" / "library" / "llama3.2-vision" / "latest"
        listed = c.list().models[0]
        assert listed.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()
        assert listed.size == sum(layer["size"] for layer in json.loads(manifest.read_text())["layers"])
        assert listed.modified_at.timestamp() == pytest.approx(manifest.stat().st_mtime, abs=1e-3)
        assert [m.model for m in c.ps().models] == ["llama3.2-vision:latest"]
        assert "vision" in c.show("llama3.2-vision:latest").capabilities
        reply = c.chat(model="llama3.2-vision:latest", messages=[{"role": "user", "content": "Hi"}],
                       options={"temperature": 0, "num_predict": 3})
        assert reply.model == "llama3.2-vision:latest" and reply.done
        oa = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in oa.models.list().data] == ["llama3.2-vision:latest"]
        chat = oa.chat.completions.create(model="llama3.2-vision:latest", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2)
        assert chat.model == "llama3.2-vision:latest"
    with mllama.Model("ollama:llama3.2-vision:latest", n_ctx=64) as model:
        assert model.name == "llama3.2-vision:latest" and model.ollama_name == "llama3.2-vision:latest"


def test_cli_names_a_missing_tag_of_a_stored_model_as_ollamas(era_b, tmp_path, monkeypatch):
    """`-m llama3.2-vision:90b` with only 11b in the store: the store's error (which tags it has), not "no such
    file 'llama3.2-vision:90b'"; a name neither a file nor in the store says both; a path stays a path."""
    from mllama.cli.common import model_arg

    root = make_store(tmp_path / "models", {"application/vnd.ollama.image.model": era_b})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert model_arg("llama3.2-vision:90b") == "ollama:llama3.2-vision:90b"
    assert model_arg("llama3.2-vision") == "ollama:llama3.2-vision"  # latest: not there, but the model is
    assert model_arg("a/b/c/d/e") == "a/b/c/d/e" and model_arg("x.gguf") == "x.gguf"
    with pytest.raises(mllama.MllamaError, match="'mymodel' is neither a file nor a model in the Ollama store"):
        model_arg("mymodel")


def test_store_names_as_ollama_parses_them(tmp_path):
    """The tag follows the last ':' after the last '/': a registry's port is part of the name (it had been taken
    for the tag: localhost:5000/me/tiny was refused); parts take Ollama's characters only."""
    from mllama.ollama_store import display_name, manifest_path

    manifests = tmp_path / "manifests"
    assert manifest_path(tmp_path, "llama3.2-vision") == manifests / "registry.ollama.ai/library/llama3.2-vision/latest"
    assert manifest_path(tmp_path, "me/tiny:v1") == manifests / "registry.ollama.ai/me/tiny/v1"
    assert manifest_path(tmp_path, "localhost:5000/me/tiny:v1") == manifests / "localhost:5000/me/tiny/v1"
    assert manifest_path(tmp_path, "localhost:5000/me/tiny") == manifests / "localhost:5000/me/tiny/latest"
    assert display_name("localhost:5000/me/tiny") == "localhost:5000/me/tiny:latest"
    for bad in ("a/b/c/d", "x:../y", "../x", "a b", "host:port/x/y", "me/..", "x:a\\b"):
        with pytest.raises(mllama.ModelLoadError, match="invalid Ollama model name"):
            manifest_path(tmp_path, bad)
