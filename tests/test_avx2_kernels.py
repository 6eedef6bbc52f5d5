"""The AVX2 kernel family (CPUs without AVX-512 BF16: csrc/kernels/x86/gemm_avx2.cpp, attn_avx2.cpp,
xattn_avx2.cpp and gelu.cpp's AVX2 form; qmm_q6k_avx2.cpp and qmm_q4k_avx2.cpp: tests/test_qmm_kernels.py; the
cross-attention's driver checks its AVX-512 form, xattn_avx512.cpp, here too):
each kernel against ggml or a double-precision reference within bounds derived from its roundings
(tests/c/gemm_avx2.cpp, attn_bf16.cpp, xattn.cpp), and the whole tower and the decode cross-attention
against ggml's ops. On an AVX-512 BF16 machine MLLAMA_AVX512=0 makes
the kernels take their AVX2 forms, so the family is checked on every x86 machine with AVX2."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mllama._native.cpu_features import cpu_flags, ggml_features
from test_cpu_kernels import assert_cross_attention_matches_ggml, build_kernel_driver, encode, nmse

AVX2 = ggml_features().get("AVX2_KERNELS") == "1"
needs_avx2 = pytest.mark.skipif(not AVX2, reason="this build or CPU has no AVX2 kernels (x86-64 with AVX2, FMA, F16C)")
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def run_driver(driver, *args, env: dict | None = None) -> dict:
    proc = subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.startswith("skip"), proc.stdout
    return dict(item.split("=") for item in proc.stdout.split())


@pytest.fixture(scope="module")
def gemm_driver(tmp_path_factory):
    return build_kernel_driver(tmp_path_factory.mktemp("gemm") / "gemm_avx2", "gemm_avx2", ["gemm_avx2", "gelu"])


@pytest.fixture(scope="module")
def layer_norm_driver(tmp_path_factory):
    return build_kernel_driver(tmp_path_factory.mktemp("layer_norm") / "layer_norm", "layer_norm", ["layer_norm"])


@pytest.fixture(scope="module")
def attn_driver(tmp_path_factory):
    return build_kernel_driver(tmp_path_factory.mktemp("attn") / "attn_bf16", "attn_bf16", ["attn_avx2"])


@needs_avx2
@needs_cxx
@pytest.mark.parametrize("k,m,n", [(2, 16, 1), (32, 16, 1), (64, 48, 31), (96, 80, 33), (514, 32, 7), (1280, 1280, 70),
                                   (320, 208, 251), (5120, 48, 200)])
def test_avx2_gemm_within_the_summation_bound(gemm_driver, k, m, n):
    """The GEMM with bias, and with bias and GELU, against ggml's mul_mat + bias (+ gelu_erf) on the same
    BF16 values: every output within the bound of two F32 summation orders (tests/c/gemm_avx2.cpp). The
    shapes reach the edges of the blocking: K of one pair and K past a 256-k chunk (514: a 1-pair last
    chunk), 5120 (20 chunks), token tails of every micro-step size (N % 5), several 120-token blocks per
    thread (N = 251), one or many 16-channel groups. A wrong pair, channel or token is off by O(|y|),
    thousands of times the bound (swapped k values of a pair read ~9e4 of it)."""
    fields = run_driver(gemm_driver, k, m, n, 2)
    assert float(fields["avx2"]) <= 1.0, fields
    assert float(fields["gelu"]) <= 1.0, fields


@needs_avx2
@needs_cxx
@pytest.mark.parametrize("n,rows,bias", [(1280, 37, 1), (100, 5, 1), (7, 3, 0)])
def test_avx2_layer_norm_within_its_rounding_bound(layer_norm_driver, monkeypatch, n, rows, bias):
    """The AVX2 form of the fused layer norm (F32 out, the AVX2 GEMM's input) against the exact norm in
    double, within the error of its F32 sums (tests/c/layer_norm.cpp); n % 8 != 0 reaches the scalar tail."""
    monkeypatch.setenv("MLLAMA_AVX512", "0")  # an AVX-512 CPU runs the AVX2 form too
    fields = run_driver(layer_norm_driver, n, rows, bias, 3)
    assert fields["type"] == "f32" and float(fields["ratio"]) <= 1.0, fields


@needs_avx2
@needs_cxx
@pytest.mark.parametrize("d,h,n", [(80, 2, 100), (80, 3, 257), (64, 1, 64), (16, 2, 33), (128, 1, 130), (72, 2, 70),
                                   (80, 1, 1100)])
def test_avx2_attention_within_its_rounding_bound(attn_driver, d, h, n):
    """Masked attention against the double-precision softmax on unrounded queries and BF16 keys and
    values: within the bound of F32 scores, e^x and F32 sums (tests/c/attn_bf16.cpp), for head sizes that
    are not multiples of 16 (72) or odd multiples of 8, key counts that leave partial 8-key groups and
    64-key blocks, more keys than one 512-key chunk, fully masked rows (zeros) and masked keys."""
    fields = run_driver(attn_driver, d, h, n, 2)
    assert fields["avx2"] != "none" and float(fields["avx2"]) <= 1.0, fields


@needs_avx2
@needs_cxx
@pytest.mark.parametrize("d,h,n", [(80, 2, 300), (80, 3, 1100), (16, 2, 170), (128, 1, 200)])
def test_attention_skips_the_key_blocks_the_mask_hides_exactly(attn_driver, d, h, n):
    """The vision mask (padding x padding pairs -inf: ATTN_MASK=pad in tests/c/attn_bf16.cpp) hides the padding
    keys' blocks from the padding rows, and rows that are all padding skip them (kernels/x86/attn_mask.h): every
    path (AVX2; AVX-512 BF16 and emulated AMX tiles where the CPU has AVX-512 BF16) within its rounding bound and
    bit for bit what it gives without the skip. The shapes: hidden blocks within one key chunk and across whole
    chunks (N = 1100: the AVX2 path skips widening a chunk no row of a tile sees), steps the tile path trims
    (keys from N / 3 on), small and two-pass head sizes."""
    fields = run_driver(attn_driver, d, h, n, 2, env={"ATTN_MASK": "pad", "MLLAMA_AMX_EMULATE": "1"})
    assert int(fields["hidden"]) == (n + 63) // 64 - (n // 3 + 63) // 64 > 0, fields
    assert fields["same"] == "1", fields
    assert float(fields["avx2"]) <= 1.0, fields
    for path in ("avx512", "tiles"):
        assert fields[path] == "none" or float(fields[path]) <= 1.0, fields
    assert (fields["avx512"] == "none") == (fields["tiles"] == "none"), fields


@pytest.fixture(scope="module")
def xattn_driver(tmp_path_factory):
    return build_kernel_driver(tmp_path_factory.mktemp("xattn") / "xattn", "xattn",
                               ["xattn", "xattn_avx2", "xattn_avx512", "xattn_amx"])


# The AMX tile path of the cross-attention runs on the hardware's tiles where the CPU has them, else on emulated
# tiles (any AVX-512 BF16 CPU), so that its logic is checked on every such machine.
XATTN_TILES_ENV = {} if ggml_features().get("AMX_TILE_KERNELS") == "1" else {"MLLAMA_AMX_EMULATE": "1"}


def assert_both_xattn_forms_within_bound(fields: dict, d: int, t: int) -> None:
    """The AVX2 form always; the AVX-512 form where the AVX-512 BF16 family runs, and only there; the AMX tiles
    there from k_xattn_tile_min_tokens (16) tokens when D % 32 == 0, and only then."""
    assert float(fields["avx2"]) <= 1.0, fields
    avx512_family = ggml_features().get("AVX512_BF16_KERNELS") == "1"
    assert (fields["avx512"] != "none") == avx512_family, fields
    assert fields["avx512"] == "none" or float(fields["avx512"]) <= 1.0, fields
    assert (fields["amx"] != "none") == (avx512_family and t >= 16 and d % 32 == 0), fields
    assert fields["amx"] == "none" or float(fields["amx"]) <= 1.0, fields


@needs_avx2
@needs_cxx
@pytest.mark.parametrize("d,hq,hkv,t,n_kv", [(128, 32, 8, 1, 1601), (64, 5, 1, 3, 130), (16, 3, 3, 2, 65),
                                             (128, 16, 1, 1, 200), (32, 8, 2, 4, 7), (256, 4, 2, 1, 323),
                                             (128, 32, 8, 40, 400), (64, 8, 2, 70, 129), (96, 8, 2, 3, 150),
                                             (128, 32, 8, 16, 1601), (96, 5, 1, 19, 130), (32, 16, 2, 33, 200)])
def test_decode_cross_attention_within_its_rounding_bound(xattn_driver, d, hq, hkv, t, n_kv):
    """The decode cross-attention's two block steps (AVX2 on every x86 CPU, AVX-512 where the AVX-512 BF16
    family runs) against the double-precision softmax on the same F16 keys and values, within the bound of F32
    scores, e^x and F32 sums (tests/c/xattn.cpp): the model's heads (32 over 8, 1601 keys), query groups of 1,
    2, 4, 5 and 16 heads (both forms take four at a time), live-key counts of every remainder mod 4 (the AVX-512
    form takes keys in fours; the one-token shapes alone, the AVX2 form's, 0, 2 and 3: odd and even counts for its
    pairs of keys), a block of 64 hidden keys, biases, a token that sees no key (zeros), head sizes 16
    to 256 (the AVX-512 form's value sums 64 channels at a time, then 16), prefill's 16 to 70 tokens (from 2 tokens,
    the AVX2 family's chunk step: 5-row micro steps and every remainder; keys short of a 16-key strip), which also
    take the AMX tiles (their rows: G tokens' heads, 16 a tile, so a tile holds parts of several tokens when G = 5;
    D = 96 and 32: value passes of 64 channels with padding). Mutations (a head's probabilities read for its
    neighbour's, a repeated key counted in the softmax sum, hidden keys not skipped) give 130 to 1e30 times the
    bound; the chunk step's last key of a partial strip left out, 190 to 5700 times."""
    fields = run_driver(xattn_driver, d, hq, hkv, t, n_kv, 2, env=XATTN_TILES_ENV)
    assert_both_xattn_forms_within_bound(fields, d, t)


@needs_avx2
@needs_cxx
@pytest.mark.parametrize("t,threads", [(8, 16), (5, 3), (40, 16)])
def test_cross_attention_token_chunks_on_many_threads(xattn_driver, t, threads):
    """The kernel's work split on more threads than 2: tokens in chunks sized so that every thread gets a unit
    (8 tokens x 8 KV heads on 16 threads: chunks of 4; 5 tokens on 3 threads: 8; 40 on 16: 8, some threads
    with several chunks; each chunk's heads in ranges so that every thread gets a unit, the units going round the
    threads), the same bound as above: a token or head left out, or written twice, fails it."""
    fields = run_driver(xattn_driver, 128, 32, 8, t, 400, threads, env=XATTN_TILES_ENV)
    assert_both_xattn_forms_within_bound(fields, 128, t)


@pytest.fixture
def avx2_family(monkeypatch):
    monkeypatch.setenv("MLLAMA_AVX512", "0")  # an AVX-512 CPU runs the AVX2 forms too


@needs_avx2
def test_avx2_tower_matches_ggml_on_bf16_weights(converted, monkeypatch, avx2_family):
    """The tower and projector with the AVX2 kernels against ggml's ops on the same BF16 weights. The
    GEMM takes x in F32 where ggml rounds it to BF16 (every product's input: the layer norm's output
    for q, k and v, the attention's for o, fc1's, and fc2's GELU output), so it is closer to the F32
    computation than ggml; the attention rounds K and V to BF16 as the AVX-512 path does (its bound
    there: 2e-5)."""
    path = converted("bf16")
    reference = encode(converted("f32"), monkeypatch, "0")  # the same BF16 weights, computed in F32
    generic = encode(path, monkeypatch, "0")
    gemm = encode(path, monkeypatch, "gemm")
    gemm_gelu = encode(path, monkeypatch, "gemm,gelu")
    every = encode(path, monkeypatch, None)
    assert 0 < nmse(gemm, generic) <= 1e-5
    assert nmse(gemm, reference) <= nmse(generic, reference)
    assert 0 < nmse(gemm_gelu, generic) <= 1e-5
    assert nmse(gemm_gelu, reference) <= nmse(generic, reference)
    assert 0 < nmse(every, generic) <= 2e-5


@needs_avx2
@pytest.mark.parametrize("n_tiles,ar_id", [(4, 6), (1, 1)])
def test_avx2_attention_and_gelu_match_ggml_on_f16_weights(converted, monkeypatch, avx2_family, n_tiles, ar_id):
    """F16 weights keep ggml's products (no BF16 GEMM for them); the attention and GELU kernels run."""
    generic = encode(converted("f16"), monkeypatch, "0", n_tiles, ar_id)
    every = encode(converted("f16"), monkeypatch, None, n_tiles, ar_id)
    exact = encode(converted("f32"), monkeypatch, "0", n_tiles, ar_id)
    assert 0 < nmse(every, generic) <= 2e-5
    assert nmse(every, exact) <= nmse(generic, exact) + 2e-5


@needs_avx2
def test_avx2_decode_cross_attention_matches_ggml(converted, monkeypatch, tmp_path, avx2_family):
    """The model's decode cross-attention on the AVX2 form against ggml's flash attention (F16 caches)."""
    assert_cross_attention_matches_ggml(converted, monkeypatch, tmp_path)


@needs_avx2
def test_avx512_switch_is_read_per_model(converted, monkeypatch):
    """MLLAMA_AVX512=0 is read when a model builds its graphs, not once per process: on an AVX-512 BF16
    CPU the two families sum differently, elsewhere both runs are the AVX2 family's, bit for bit."""
    path = converted("bf16")
    monkeypatch.delenv("MLLAMA_AVX512", raising=False)
    default = encode(path, monkeypatch, None)
    monkeypatch.setenv("MLLAMA_AVX512", "0")
    avx2 = encode(path, monkeypatch, None)
    if "avx512_bf16" in cpu_flags():
        assert nmse(default, avx2) > 0
    else:
        assert nmse(default, avx2) == 0
