"""The text layers' q, k, v and gate, up multiplied as one matrix each (csrc/model/placement.h's
fuse_projections; cpu_kernels "fuse"): the repacked weights of a group lie one after the other in ggml's CPU_REPACK
buffer, and the decoder multiplies the group as one [K, sum of M] matrix, then views each part's rows. Every
product the decoder uses splits its work by output channels and computes each channel as it would alone, so the
logits must equal those of the separate products bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import mllama
from mllama._native.cpu_features import ggml_features
from mllama.dev.synthetic_gguf import write_synthetic_gguf
from test_synthetic_and_profile import TEXT, VISION

# Q4_K_M of TEXT: layers 0 and 2 are self-attention layers (q, k, v in layer 0; v of layer 2 keeps more bits, so q
# and k there), layer 1 a cross-attention layer; every layer's gate and up.
GROUPS = 5
WITHOUT_FUSE = "attn,gemm,gelu,xattn,qmm,amx"
PROMPT = [128000, 9906, 1917] + list(range(1000, 1037))  # 40 rows: prefill's tile product from 32 rows on AMX


def fused_line(path, **options) -> str:
    with mllama.Model(path, **options) as model:
        return model.op_paths()["text matrices"]


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    path = write_synthetic_gguf(tmp_path_factory.mktemp("fuse") / "q4km.gguf", TEXT, VISION, type="q4_k_m",
                                vision_type="bf16")
    if "CPU_REPACK" not in fused_line(path, cpu_kernels="0"):  # ggml repacks Q4_K for AVX2 (x86) and some ARM cores
        pytest.skip("ggml keeps this CPU's Q4_K weights in the file layout: nothing is fused (the tests would compare "
                    "a path with itself)")
    return path


def test_groups_fused_where_adjacent_and_allowed(q4km, monkeypatch):
    """The repacked q/k(/v) and gate/up of this model form 5 groups; the context uses them unless its cpu_kernels
    leave "fuse" out; weights left in the file layout (MLLAMA_REPACK=0) form none."""
    said = f"q, k, v and gate, up as one product each where adjacent in the repacked buffer ({GROUPS} groups)"
    assert said in fused_line(q4km)
    assert said in fused_line(q4km, cpu_kernels="fuse")
    assert "as one product" not in fused_line(q4km, cpu_kernels=WITHOUT_FUSE)
    assert "as one product" not in fused_line(q4km, cpu_kernels="0")
    monkeypatch.setenv("MLLAMA_REPACK", "0")
    assert "as one product" not in fused_line(q4km)


def logits(path, kernels: str, profile=None) -> tuple[np.ndarray, np.ndarray]:
    """All 40 rows' logits of the prompt, then one row's (a decode-sized product)."""
    with mllama.Model(path, cpu_kernels=kernels, profile=profile) as model:
        return model.forward(PROMPT), model.forward(PROMPT[:1])


@pytest.mark.parametrize("fused,separate,avx512", [("1", WITHOUT_FUSE, None), ("1", WITHOUT_FUSE, "0"),
                                                   ("fuse", "0", None)])
def test_fused_products_equal_the_separate_ones_bit_for_bit(q4km, monkeypatch, fused, separate, avx512):
    """Our products (the VNNI or AVX2 Q4_K kernel at 1 row, AMX tiles at 40 where the CPU has them, else the kernel
    in passes) and ggml's repacked mul_mat alone ("fuse" against "0"), on the fused matrices and on the separate ones:
    equal logits. A part's rows viewed at a wrong offset or stride, or a part left out, changes them."""
    if avx512 is not None:
        if ggml_features().get("AVX2_KERNELS") != "1":
            pytest.skip("no AVX2 kernel family here")
        monkeypatch.setenv("MLLAMA_AVX512", avx512)
    a, b = logits(q4km, fused), logits(q4km, separate)
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.all(np.isfinite(x)) and x.std() > 0
        assert np.array_equal(x, y), float(np.max(np.abs(x - y)))


def test_one_product_per_group_in_the_profile(q4km, tmp_path):
    """ggml's mul_mat alone ("fuse"): the profile shows products over the groups' shapes, [256 -> 384] (q, k of
    layer 2: 256 + 128) and [256 -> 1024] (gate, up), and none of k's or v's alone ([256 -> 128]: layer 0's, in its
    q, k, v group, [256 -> 512], the shape of a gate alone here); without "fuse" the reverse."""
    logits(q4km, "fuse", tmp_path / "fused.tsv")
    logits(q4km, "0", tmp_path / "separate.tsv")
    fused, separate = (tmp_path / "fused.tsv").read_text(), (tmp_path / "separate.tsv").read_text()
    for shape in ("q4_K[256,384,1]", "q4_K[256,1024,1]"):
        assert f"MUL_MAT {shape}" in fused and shape not in separate, (shape, fused)
    assert "MUL_MAT q4_K[256,128,1]" in separate and "q4_K[256,128,1]" not in fused, fused
