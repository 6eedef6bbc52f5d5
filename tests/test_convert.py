"""Converter: exact round trips, casts, quantization error, type policy, metadata, and safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import mllama
from mllama._native import names
from mllama.convert.tensor_map import map_name


def gguf_name(hf_name: str) -> str:
    target = map_name(hf_name)
    return names.tensor(target.tensor_id, target.layer)


def load_all(path: Path) -> dict[str, np.ndarray]:
    with mllama.Model(path, device="cpu") as model:
        return {t.name: model.read_tensor(t.name) for t in model.tensors()}


def tensor_types(path: Path) -> dict[str, str]:
    with mllama.Model(path, device="cpu") as model:
        return {t.name: t.type.lower() for t in model.tensors()}


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-30))


def test_f32_round_trip_is_exact_through_the_loader(gguf_f32, hf_weights):
    loaded = load_all(gguf_f32)
    assert len(loaded) == len(hf_weights)
    for hf_name, ref in hf_weights.items():
        got = loaded[gguf_name(hf_name)]
        assert got.shape == ref.shape, hf_name
        assert np.array_equal(got, ref), hf_name


@pytest.fixture(scope="module")
def reader_f32(gguf_f32) -> GGUFReader:
    return GGUFReader(gguf_f32)


def test_f32_round_trip_is_exact_through_gguf_reader(reader_f32, hf_weights):
    reader = reader_f32
    by_name = {t.name: t for t in reader.tensors}
    for hf_name, ref in hf_weights.items():
        t = by_name[gguf_name(hf_name)]
        assert np.array_equal(np.asarray(t.data).reshape(ref.shape), ref), hf_name


@pytest.mark.parametrize("type_name,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_equal_the_cast(converted, hf_weights, type_name, torch_dtype):
    loaded = load_all(converted(type_name))
    n_cast = 0
    for hf_name, ref in hf_weights.items():
        got = loaded[gguf_name(hf_name)]
        tables = ("positional_embedding", "class_embedding")
        if ref.ndim == 1 or any(s in hf_name for s in tables):
            assert np.array_equal(got, ref), f"{hf_name} must stay F32"
            continue
        cast = torch.from_numpy(ref).to(torch_dtype).to(torch.float32).numpy()
        assert np.array_equal(got, cast), hf_name
        n_cast += 1
    assert n_cast > 50


@pytest.mark.parametrize("type_name,max_nmse", [("q8_0", 5e-5), ("q4_k", 8e-3), ("q4_0", 1.2e-2)])
def test_quantized_text_weights_within_type_error(converted, hf_weights, type_name, max_nmse):
    path = converted(type_name)
    loaded = load_all(path)
    types = tensor_types(path)
    quantized = 0
    for hf_name, ref in hf_weights.items():
        name = gguf_name(hf_name)
        if name.startswith(("v.", "mm.")):
            assert types[name] in ("f16", "f32"), f"{name} is a vision/projector tensor: never quantized"
            continue
        if ref.ndim == 1:
            assert types[name] == "f32" and np.array_equal(loaded[name], ref), name
            continue
        assert types[name] not in ("f16", "f32"), f"{name} should be quantized, is {types[name]}"
        err = nmse(loaded[name], ref)
        assert err <= max_nmse, (name, types[name], err)
        quantized += 1
    assert quantized >= 30


def test_k_quant_used_where_rows_allow_and_fallback_elsewhere(converted):
    types = tensor_types(converted("q4_k"))
    # rows of 256 (n_ff) take Q4_K; rows of 64 (n_embd) cannot, and fall back to Q8_0
    assert types["blk.0.ffn_down.weight"] == "q4_k"
    assert types["blk.0.ffn_up.weight"] == "q8_0"
    assert types["v.blk.0.attn_q.weight"] == "f16"
    assert types["v.tile_position_embd.weight"] == "f32"
    assert types["mm.0.weight"] == "f16"


def test_q4_k_m_mix_gives_chosen_layers_q6_k(converted):
    from mllama.convert import uses_more_bits

    types = tensor_types(converted("q4_k_m"))
    # 4 layers: the last eighth (layer 3) and every third from n/8 (layer 2) keep more bits
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["q4_k", "q4_k", "q6_k", "q6_k"]
    assert types["blk.0.ffn_up.weight"] == "q8_0"  # rows of 64: no k-quant fits
    assert types["output.weight"] == "q8_0"       # Q6_K wanted, rows of 64: falls back the same way
    assert [i for i in range(40) if uses_more_bits(i, 40)] == [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34,
                                                                 35, 36, 37, 38, 39]  # llama.cpp's rule for the 11B


def test_metadata_matches_the_checkpoint(reader_f32, hf_dir):
    reader = reader_f32
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    assert field("general.architecture") == "mllama"
    assert field(names.key("VOCAB_SIZE")) == config["text_config"]["vocab_size"] == 128256
    assert field(names.key("CROSS_ATTENTION_LAYERS")) == [1, 3]
    assert field(names.key("V_INTERMEDIATE_LAYERS")) == [0, 2]
    assert field(names.key("V_ASPECT_RATIOS")) == [1, 1, 1, 2, 1, 3, 1, 4, 2, 1, 2, 2, 3, 1, 4, 1]
    assert field(names.key("ROPE_SCALING_TYPE")) == "llama3"
    assert field(names.key("IMAGE_TOKEN_ID")) == 128256
    assert field(names.key("TOK_EOS_IDS")) == [128001, 128008, 128009]
    assert field(names.key("TOK_EOT_ID")) == 128009
    assert np.allclose(field(names.key("V_IMAGE_MEAN")), [0.48145466, 0.4578275, 0.40821073])
    assert abs(field(names.key("GEN_TEMPERATURE")) - 0.6) < 1e-7
    tokens = field(names.key("TOK_TOKENS"))
    assert len(tokens) == 128257 and tokens[128256] == "<|image|>" and tokens[128009] == "<|eot_id|>"
    vocab = tokenizer["model"]["vocab"]
    assert all(tokens[i] == t for t, i in list(vocab.items())[:5000])
    types = field(names.key("TOK_TOKEN_TYPE"))
    assert types[128000] == 3 and types[128256] == 3 and types[1000] == 1
    merges = field(names.key("TOK_MERGES"))
    first = tokenizer["model"]["merges"][0]
    assert merges[0] == (first if isinstance(first, str) else " ".join(first))
    assert len(merges) == len(tokenizer["model"]["merges"])
    assert field(names.key("TOK_CHAT_TEMPLATE")).startswith("{{- bos_token }}")


def test_loader_hparams_match_the_config(gguf_f32):
    with mllama.Model(gguf_f32) as model:
        hp = model.hparams
    assert (hp.n_vocab, hp.n_vocab_embd, hp.n_tokens) == (128256, 128264, 128257)
    assert (hp.n_embd, hp.n_ff, hp.n_layer, hp.n_head, hp.n_head_kv) == (64, 256, 4, 4, 2)
    assert hp.cross_attention_layers == (1, 3) and hp.n_cross_layer == 2
    assert (hp.v_n_embd, hp.v_n_layer, hp.v_n_global_layer, hp.v_n_head) == (32, 3, 1, 2)
    assert (hp.v_image_size, hp.v_patch_size, hp.v_n_patches, hp.v_n_positions) == (56, 14, 16, 17)
    assert hp.v_output_dim == 96 and hp.projection_dim == 64
    assert hp.aspect_ratios[1] == (1, 2) and hp.aspect_ratios[4] == (2, 1)
    assert hp.rope_scaling == 1 and hp.rope_scaling_factor == 8.0 and hp.rope_orig_ctx == 8192
    assert (hp.bos_token_id, hp.eot_token_id, hp.pad_token_id, hp.image_token_id) == (128000, 128009, 128004, 128256)


def test_in_memory_transformers5_names_are_accepted(hf_dir, tmp_path, hf_weights):
    from safetensors.numpy import save_file
    from tiny_checkpoint import build_model

    model = build_model(seed=0)
    folder = tmp_path / "inmem"
    folder.mkdir()
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(folder / "model.safetensors"))
    out = mllama.convert(folder, tmp_path / "inmem.gguf", type="f32")
    loaded = load_all(out)
    for hf_name, ref in hf_weights.items():
        assert np.array_equal(loaded[gguf_name(hf_name)], ref), hf_name


def test_refuses_to_overwrite_without_force(gguf_f32, hf_dir, tmp_path):
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"precious user data")
    with pytest.raises(FileExistsError):
        mllama.convert(hf_dir, out, type="f32")
    assert out.read_bytes() == b"precious user data"
    mllama.convert(hf_dir, out, type="f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_failed_conversion_leaves_nothing_behind(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(mllama.ConversionError):
        mllama.convert(broken, out, type="f16", force=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out.gguf"]


def test_interrupted_conversion_leaves_no_partial_file(hf_dir, tmp_path, monkeypatch):
    from mllama.convert import writer

    calls = {"n": 0}
    real = writer._write_tensor

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_tensor", interrupt)
    with pytest.raises(KeyboardInterrupt):
        mllama.convert(hf_dir, tmp_path / "x.gguf", type="q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("broken,message", [
    ("no_config", "config.json is missing"),
    ("not_mllama", "expected 'mllama'"),
    ("no_tokenizer", "no tokenizer.json"),
    ("no_weights", "no .safetensors"),
])
def test_bad_checkpoint_folders_raise_conversion_error(hf_dir, tmp_path, broken, message):
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in hf_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if broken == "no_config":
        os.remove(folder / "config.json")
    elif broken == "not_mllama":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(cfg))
    elif broken == "no_tokenizer":
        os.remove(folder / "tokenizer.json")
    else:
        os.remove(folder / "model.safetensors")
    with pytest.raises(mllama.ConversionError, match=message):
        mllama.convert(folder, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_unknown_type_is_rejected(hf_dir, tmp_path):
    with pytest.raises(mllama.ConversionError, match="unknown or unwritable"):
        mllama.convert(hf_dir, tmp_path / "o.gguf", type="q9_9")
    with pytest.raises(mllama.ConversionError, match="vision weights are kept unquantized"):
        mllama.convert(hf_dir, tmp_path / "o.gguf", type="q8_0", vision_type="q8_0")


@pytest.mark.parametrize("index, message", [
    ('{"metadata": {}}', "unreadable checkpoint index"),
    ("[1, 2]", "unreadable checkpoint index"),
    ("{not json", "unreadable checkpoint index"),
    ('{"weight_map": {}}', "does not list"),  # its shard's tensors, named nowhere
])
def test_a_bad_shard_index_is_a_conversion_error_naming_it(hf_dir, tmp_path, index, message):
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in hf_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")  # (model.safetensors wins)
    (folder / "model.safetensors.index.json").write_text(index)
    if "weight_map" in index:  # an index that names no shard lists none: give it the one shard, but no tensor
        shard = '{"weight_map": {"x": "model-00001-of-00001.safetensors"}}'
        (folder / "model.safetensors.index.json").write_text(shard)
    with pytest.raises(mllama.ConversionError, match=message):
        mllama.convert(folder, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_output_paths_that_would_lose_something(hf_dir, tmp_path):
    with pytest.raises(mllama.ConversionError, match="is a folder"):  # not "exists: pass --force"
        mllama.convert(hf_dir, tmp_path)
    copy = tmp_path / "hf"
    copy.mkdir()
    for f in hf_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = (copy / "model.safetensors").read_bytes()
    (copy / "notes").mkdir()
    (copy / "notes" / "README.md").write_text("the model card")
    if not (copy / "chat_template.jinja").exists():
        (copy / "chat_template.jinja").write_text("{{ messages }}")
    for name in ("model.safetensors", "chat_template.jinja", "notes/README.md"):  # any file of it, at any depth
        before = (copy / name).read_bytes()
        with pytest.raises(mllama.ConversionError, match="a file of the checkpoint"):
            mllama.convert(copy, copy / name, force=True)
        assert (copy / name).read_bytes() == before
    assert (copy / "model.safetensors").read_bytes() == weights


def test_sigterm_during_convert_leaves_no_partial_file(hf_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mllama", "convert", str(hf_dir), "-o", str(out / "x.gguf"),
                             "--type", "q2_k", "-q"], stderr=subprocess.PIPE, text=True)
    for _ in range(2000):  # until its partial file exists
        if out.is_dir() and any(p.name.endswith(".partial") for p in out.iterdir()):
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("no partial file appeared")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, proc.stderr.read()
    assert list(out.iterdir()) == []


def copy_checkpoint(hf_dir: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in hf_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_a_checkpoint_file_behind_a_link_is_never_replaced(hf_dir, tmp_path):
    blobs = copy_checkpoint(hf_dir, tmp_path / "hub" / "blobs")  # the Hugging Face cache: a snapshot of links
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    with pytest.raises(mllama.ConversionError, match="a file of the checkpoint"):
        mllama.convert(snapshot, snapshot / "model.safetensors", force=True)
    assert (snapshot / "model.safetensors").is_symlink() and \
        (blobs / "model.safetensors").read_bytes() == (hf_dir / "model.safetensors").read_bytes()


def test_checkpoint_files_are_read_as_transformers_reads_them(gguf_f32, hf_dir, tmp_path):
    stale = copy_checkpoint(hf_dir, tmp_path / "stale")  # a single-file save over a sharded one keeps its index
    (stale / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    (stale / "chat_template.jinja").write_text("{{ 'from the jinja file' }}")  # it overrides tokenizer_config's
    config = json.loads((stale / "tokenizer_config.json").read_text())
    (stale / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'from the config' }}"}))
    out = mllama.convert(stale, tmp_path / "o.gguf", type="f32")
    expected = load_all(gguf_f32)
    assert all(np.array_equal(a, expected[name]) for name, a in load_all(out).items())
    with mllama.Model(out) as model:
        assert model.meta_string("tokenizer.chat_template") == "{{ 'from the jinja file' }}"
    twice = copy_checkpoint(hf_dir, tmp_path / "twice")  # a tensor in two shards: which one is meant is not known
    (twice / "model.safetensors").rename(twice / "a.safetensors")
    (twice / "b.safetensors").write_bytes((twice / "a.safetensors").read_bytes())
    with pytest.raises(mllama.ConversionError, match="is in both a.safetensors and b.safetensors"):
        mllama.convert(twice, tmp_path / "t.gguf")


@pytest.mark.parametrize("section, key, value", [
    ("text_config", "rope_parameters", {"rope_type": "llama3", "factor": 8.0}),  # (no low_freq_factor...)
    ("text_config", "rope_parameters", "llama3"),
    ("text_config", "num_attention_heads", 0),
    ("text_config", "cross_attention_layers", None),
    ("text_config", "max_position_embeddings", None),
    ("vision_config", "hidden_size", None),
])
def test_malformed_config_fields_are_conversion_errors(hf_dir, tmp_path, section, key, value):
    folder = copy_checkpoint(hf_dir, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config[section][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(mllama.ConversionError, match="config.json"):  # (KeyError, ZeroDivisionError, TypeError...)
        mllama.convert(folder, tmp_path / "o.gguf")


def test_an_output_name_as_long_as_the_file_system_takes(gguf_f32, hf_dir, tmp_path):
    out = tmp_path / ("m" * 245 + ".gguf")  # (its temporary name had been 20 bytes past the 255 limit)
    assert mllama.convert(hf_dir, out, type="f32") == out and out.stat().st_size == gguf_f32.stat().st_size
