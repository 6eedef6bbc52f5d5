"""The direct random-weight GGUF writer used by the benchmarks, and the per-op profile."""

from __future__ import annotations

import numpy as np
import pytest

import mllama
from mllama.dev.synthetic_gguf import write_synthetic_gguf

TEXT = {"vocab_size": 128256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "cross_attention_layers": [1], "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 4096, "bos_token_id": 128000, "eos_token_id": 128009,
        "pad_token_id": 128004, "tie_word_embeddings": False, "hidden_act": "silu"}
VISION = {"hidden_size": 32, "attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
          "intermediate_layers_indices": [0], "vision_output_dim": 64, "image_size": 28, "patch_size": 14,
          "max_num_tiles": 4, "num_channels": 3, "norm_eps": 1e-5, "hidden_act": "gelu",
          "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_gguf(tmp_path_factory.mktemp("syn") / "s.gguf", TEXT, VISION, type="q4_k_m", vision_type="bf16")


def test_synthetic_gguf_has_the_converters_layout_and_sane_weights(synthetic):
    with mllama.Model(synthetic) as model:
        types = {t.name: t.type for t in model.tensors()}
        assert types["output.weight"] == "q6_K" and types["blk.0.attn_q.weight"] == "q4_K"
        assert types["blk.2.ffn_down.weight"] == "q6_K"  # 3 layers: the last one keeps more bits
        assert types["v.blk.0.attn_q.weight"] == "bf16" and types["v.tile_position_embd.weight"] == "f32"
        for name, n_in in (("blk.0.ffn_up.weight", 256), ("output.weight", 256), ("blk.0.ffn_down.weight", 512)):
            w = model.read_tensor(name)
            assert abs(float(w.std()) * np.sqrt(n_in) - 1.0) < 0.1 and abs(float(w.mean())) < 0.1 / np.sqrt(n_in), name
        logits = model.forward([128000, 9906, 1917])
        assert np.isfinite(logits).all() and logits.std() > 0


def test_profile_writes_per_op_timings(small_gguf, tmp_path, monkeypatch):
    out = tmp_path / "ops.tsv"
    monkeypatch.setenv("MLLAMA_PROFILE", str(out))
    with mllama.Model(small_gguf) as model:
        model.forward([1, 2, 3])
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["seconds", "share", "count", "gflops", "op"] and rows[-1][-1] == "total"
    ops = {r[4].split()[0] for r in rows[1:-1]}
    assert {"MUL_MAT", "RMS_NORM", "GET_ROWS"} <= ops
    assert abs(sum(float(r[1]) for r in rows[1:-1]) - 1.0) < 0.01
