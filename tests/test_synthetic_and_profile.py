"""The direct random-weight GGUF writer used by the benchmarks, the per-op profile, and the image's cross-attention
K/V of quantized weights on the BF16 GEMM (a q4_K model with BF16 vision weights, as the benchmarks write)."""

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


@pytest.mark.parametrize("repack,avx512", [("1", None), ("0", None), ("1", "0")])
def test_cross_kv_of_quantized_weights_within_the_bf16_bound(synthetic, monkeypatch, repack, avx512):
    """Where the vision tower's BF16 GEMM runs, the image's cross-attention K and V projections (q4_K here:
    ggml's repacked layout, or the file layout with MLLAMA_REPACK=0) run on it with the weights decoded to BF16
    (csrc/kernels/x86/dequant_bf16.cpp). Against the exact products in double of the same features: the
    projector rounds its input to BF16 (2^-9) and sums in F32 (gamma_K), so x is off by e_x <= (2^-9 + gamma_K)
    sum |f w| + u |x|; V = bf16(x) . bf16(w) off by e_x . |w| + (2^-8 + 2^-16 + 2 gamma_K) (|x| + e_x) . |w|; K's
    rms norm scales that error by g / rms and moves rms by at most the largest error. A wrong channel, block or
    nibble of the decoding is off by O(|v|), hundreds of times the bound (a quant's lowest bit dropped: 1.8x).
    MLLAMA_AVX512=0: the AVX2 family's GEMM (x in F32, inside the same bound)."""
    from mllama._native.cpu_features import ggml_features

    if ggml_features().get("AVX512_BF16_KERNELS") != "1" and ggml_features().get("AVX2_KERNELS") != "1":
        pytest.skip("no x86 kernel family here: the projections stay on ggml's mul_mat")
    if avx512 is not None and ggml_features().get("AVX2_KERNELS") != "1":
        pytest.skip("no AVX2 kernel family here")
    monkeypatch.setenv("MLLAMA_REPACK", repack)
    if avx512 is not None:
        monkeypatch.setenv("MLLAMA_AVX512", avx512)
    with mllama.Model(synthetic, n_image_slots=1) as model:
        assert model.op_paths()["image cross-attention K/V"].startswith("mllama BF16 GEMM")
        hp = model.hparams
        pixels = np.random.default_rng(3).standard_normal((hp.v_max_tiles, 3, hp.v_image_size, hp.v_image_size))
        feats = model.encode_pixels(pixels.astype(np.float32), 6, 4, slot=0).reshape(-1, hp.v_output_dim)
        k, v = (t.reshape(t.shape[0], -1).astype(np.float64) for t in model.cross_kv(0, 0))
        w_p, b_p = (model.read_tensor(n).astype(np.float64) for n in ("mm.0.weight", "mm.0.bias"))
        w_k, w_v, g = (model.read_tensor(f"blk.1.cross_attn_{n}").astype(np.float64)
                       for n in ("k_proj.weight", "v_proj.weight", "k_norm.weight"))
    u, f = 2.0 ** -24, feats.astype(np.float64)
    x = f @ w_p.T + b_p
    e_x = (2.0 ** -9 + f.shape[1] * u) * (np.abs(f) @ np.abs(w_p).T) + u * np.abs(x)
    eps2 = 2.0 ** -8 + 2.0 ** -16 + 2 * x.shape[1] * u
    bound = e_x @ np.abs(w_v).T + eps2 * ((np.abs(x) + e_x) @ np.abs(w_v).T)
    assert np.max(np.abs(v - x @ w_v.T) / bound) <= 1.0
    bound = e_x @ np.abs(w_k).T + eps2 * ((np.abs(x) + e_x) @ np.abs(w_k).T)  # same for K before its norm
    hd = hp.n_embd_head
    pre = (x @ w_k.T).reshape(len(x), -1, hd)
    rms = np.sqrt(np.mean(pre ** 2, axis=-1, keepdims=True) + hp.rms_norm_eps)
    err = bound.reshape(pre.shape)
    k_bound = (np.abs(g) / rms * (err + np.abs(pre) * err.max(axis=-1, keepdims=True) / rms)
               + 2 * hd * u * np.abs(pre * g / rms))  # + the rms norm's own F32 rounding
    assert np.max(np.abs(k.reshape(pre.shape) - pre * g / rms) / k_bound) <= 1.0
