"""mllama's AMX tile kernels (csrc/kernels/x86/gemm_amx.cpp, attn_amx.cpp, qmm_q4k_amx.cpp, qmm_q6k_amx.cpp): on
emulated tiles (MLLAMA_AMX_EMULATE=1, csrc/kernels/x86/amx_tiles.h) on any AVX-512 BF16 machine, and on the hardware
where the CPU has AMX-BF16: the kernels against ggml or a double-precision reference within bounds
derived from their roundings (tests/c/gemm_bf16.cpp, tests/c/attn_bf16.cpp, tests/c/qmm_q4k.cpp, qmm_q6k.cpp), the
whole tower against the AVX-512 path, and quantized models' prefill against ggml's."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import mllama
from mllama._native.cpu_features import ggml_features
from test_cpu_kernels import KERNELS, build_kernel_driver, encode, needs_kernels, nmse

AMX = ggml_features().get("AMX_TILE_KERNELS") == "1"


@pytest.fixture(scope="module")
def gemm_driver(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    return build_kernel_driver(tmp_path_factory.mktemp("gemm") / "gemm_bf16", "gemm_bf16",
                               ["gemm_bf16", "gemm_amx", "gelu"])


def gemm_ratios(driver, k, m, n, emulate: bool) -> dict:
    env = {**os.environ, "MLLAMA_AMX_EMULATE": "1" if emulate else "0"}
    proc = subprocess.run([str(driver), str(k), str(m), str(n), "2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.startswith("skip"), proc.stdout
    return dict(item.split("=") for item in proc.stdout.split())


@needs_kernels
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("k,m,n", [(32, 16, 1), (64, 48, 31), (96, 80, 33), (1280, 1280, 70), (320, 208, 100),
                                   (5120, 48, 200), (1312, 80, 300), (2592, 48, 530), (2592, 2128, 24), (100, 48, 31),
                                   (1284, 80, 9)])
def test_bf16_gemm_on_emulated_tiles_within_the_summation_bound(gemm_driver, k, m, n):
    """Both GEMM paths against ggml's mul_mat + bias on the same BF16 values: every output within the
    bound of two F32 summation orders (tests/c/gemm_bf16.cpp: 2 gamma_K sum |x w|). The tile path runs on
    emulated tiles (the same kernel code, kernels/x86/amx_tiles.h), so its blocking and edges are checked
    here on any AVX-512 BF16 machine: odd 16-channel groups (M = 16, 48, 80, 208: one B tile), token
    tails (N not a multiple of 32, N below 16), partial panels, threads splitting the tokens, blocks of 256
    tokens and a partial one (N = 530: a thread's 288 tokens and 242, the last step 18 tokens), k in chunks of
    1280 whose sums wait in memory (K = 5120: four; 2592: two and a short one of 32; 1312: one and 32), for groups
    of at most 2048 channels at a time (M = 2128: two of 17 panels, the last panel 16 channels, one B tile), k pairs
    that end short of the packing's 16 (K = 100, 1284: AVX-512 only, tiles need K % 32 == 0). A layout error
    (a wrong pair, row or channel) is off by O(|y|), thousands of times the bound."""
    fields = gemm_ratios(gemm_driver, k, m, n, emulate=True)
    assert float(fields["avx512"]) <= 1.0, fields
    if k % 32:
        assert fields["tiles"] == "none", fields
    else:
        assert fields["tiles"] != "none" and float(fields["tiles"]) <= 1.0, fields


@pytest.mark.skipif(not AMX, reason="this CPU (or its OS) has no AMX-BF16 tiles: the hardware path is checked on "
                                    "emulated tiles only (test_bf16_gemm_on_emulated_tiles_within_the_summation_bound)")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("k,m,n", [(32, 16, 1), (96, 80, 33), (1280, 1280, 70), (5120, 1280, 97), (2592, 208, 530),
                                   (2592, 2112, 100)])
def test_bf16_gemm_on_amx_hardware_within_the_summation_bound(gemm_driver, k, m, n):
    fields = gemm_ratios(gemm_driver, k, m, n, emulate=False)
    assert fields["tiles"] != "none" and float(fields["tiles"]) <= 1.0, fields


@pytest.fixture(scope="module")
def attn_driver(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    return build_kernel_driver(tmp_path_factory.mktemp("attn") / "attn_bf16", "attn_bf16", ["attn_bf16", "attn_amx"])


@needs_kernels
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("d,h,n", [(16, 2, 170), (80, 2, 1100), (128, 1, 200), (80, 3, 70), (80, 1, 300)])
def test_bf16_attention_on_emulated_tiles_within_the_rounding_bound(attn_driver, d, h, n):
    """Both attention paths against the double-precision softmax on the same BF16 inputs, each output
    within the bound of the kernel's roundings (tests/c/attn_bf16.cpp: BF16 probabilities, 2^x, F32
    sums). Tiles emulated: D = 80 pads Q and K to 96 channels (three tile steps), D = 128 takes the
    P V products in two passes (6 + 2 channel groups), N = 1100 several key chunks and a partial key
    block, N = 70 a partial query tile; steps of 4 key blocks (256 keys) and of 3 (N = 170), 2 (N = 70,
    1100) and 1 (N = 300) at the end of the keys; masked rows, and a fully masked row that must give
    zeros."""
    env = {**os.environ, "MLLAMA_AMX_EMULATE": "1"}
    proc = subprocess.run([str(attn_driver), str(d), str(h), str(n), "2"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.startswith("skip"), proc.stdout
    fields = dict(item.split("=") for item in proc.stdout.split())
    assert float(fields["avx512"]) <= 1.0, fields
    assert fields["tiles"] != "none" and float(fields["tiles"]) <= 1.0, fields


@pytest.mark.skipif(not AMX, reason="this CPU (or its OS) has no AMX-BF16 tiles: the hardware path is checked on "
                                    "emulated tiles only (test_bf16_attention_on_emulated_tiles_within_the_rounding_bound)")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("d,h,n", [(80, 2, 1100), (128, 1, 200), (80, 3, 70), (80, 1, 300)])
def test_bf16_attention_on_amx_hardware_within_the_rounding_bound(attn_driver, d, h, n):
    env = {**os.environ, "MLLAMA_AMX_EMULATE": "0"}
    proc = subprocess.run([str(attn_driver), str(d), str(h), str(n), "2"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = dict(item.split("=") for item in proc.stdout.split())
    assert fields["tiles"] != "none" and float(fields["tiles"]) <= 1.0, fields


@pytest.mark.skipif(ggml_features().get("AVX2_KERNELS") != "1",
                    reason="this build or CPU has no x86 kernels with AVX2 (x86-64 with AVX2, FMA, F16C)")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("mask", ["", "pad"])
def test_attention_softmax_takes_and_gives_no_subnormals(attn_driver, mask):
    """No path's F32 operations raise MXCSR's denormal-operand or underflow flag, masked keys included
    (tests/c/attn_bf16.cpp ATTN_FP_FLAGS): on Intel cores each such operation is a microcode assist, and the
    softmax's 2^-127 for masked keys made the attention 1.8-3x slower on an AMX Xeon. The flags are the same on every
    x86 CPU, so this fails on AMD too. The tile path runs on hardware tiles only (emulated ones are plain F32)."""
    env = {**os.environ, "MLLAMA_AMX_EMULATE": "0", "ATTN_FP_FLAGS": "1", "ATTN_MASK": mask}
    proc = subprocess.run([str(attn_driver), "80", "2", "300"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = dict(item.split("=") for item in proc.stdout.split())
    expected = {"avx2": "0", "avx512": "0" if KERNELS else "none", "tiles": "0" if AMX else "none"}
    assert {path: fields[f"{path}_subnormal"] for path in expected} == expected, fields


@needs_kernels
def test_vision_attention_on_emulated_amx_tiles_matches_the_avx512_path(converted, monkeypatch):
    """The tower with the attention's products on AMX tiles (emulated) against the AVX-512 path:
    the same BF16 operands, so the bound of test_bf16_attention_and_gelu_match_ggml_on_half_weights."""
    path = converted("f16")
    monkeypatch.setenv("MLLAMA_AMX_EMULATE", "1")
    with mllama.Model(path, cpu_kernels="attn,amx") as model:
        assert "AMX tiles, emulated" in model.op_paths()["vision attention"]
    tiles = encode(path, monkeypatch, "attn,amx")
    avx = encode(path, monkeypatch, "attn")
    generic = encode(path, monkeypatch, "0")
    assert nmse(tiles, avx) <= 2e-5 and 0 < nmse(tiles, generic) <= 2e-5


@needs_kernels
def test_bf16_gemm_on_emulated_amx_tiles_matches_the_avx512_path(converted, monkeypatch, tmp_path):
    """The whole tower and projector with the GEMMs on AMX tiles (emulated here, real on an AMX CPU
    without MLLAMA_AMX_EMULATE): the same BF16 products as the AVX-512 path, summed in another order,
    so the bounds of test_bf16_gemm_matches_ggml_on_bf16_weights hold against it."""
    path = converted("bf16")
    monkeypatch.setenv("MLLAMA_AMX_EMULATE", "1")
    with mllama.Model(path, cpu_kernels="gemm,amx") as model:
        assert "AMX tiles, emulated" in model.op_paths()["vision linear layers"]
    with mllama.Model(path, cpu_kernels="gemm") as model:
        assert "AVX512-BF16" in model.op_paths()["vision linear layers"]
    avx = encode(path, monkeypatch, "gemm,gelu", dump_dir=tmp_path / "avx")
    tiles = encode(path, monkeypatch, "gemm,gelu,amx", dump_dir=tmp_path / "tiles")
    generic = encode(path, monkeypatch, "0")
    first = [np.load(tmp_path / name / "v.blk.0.attn_out.npy") for name in ("tiles", "avx")]
    assert nmse(*first) <= 1e-8
    assert nmse(tiles, avx) <= 1e-5 and nmse(tiles, generic) <= 1e-5
    projected = [np.load(tmp_path / name / "mm.out.npy") for name in ("tiles", "avx")]
    assert nmse(*projected) <= 1e-5


@pytest.fixture(scope="module")
def q4k_tiles_driver(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    return build_kernel_driver(tmp_path_factory.mktemp("q4k") / "qmm_q4k", "qmm_q4k", ["qmm_q4k_amx"])


@pytest.fixture(scope="module")
def q6k_tiles_driver(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    return build_kernel_driver(tmp_path_factory.mktemp("q6k") / "qmm_q6k", "qmm_q6k", ["qmm_q6k_amx"])


def tiles_fields(driver, k, m, n, emulate: bool, switch: str = "QMM_Q4K_TILES") -> dict:
    env = {**os.environ, "MLLAMA_AMX_EMULATE": "1" if emulate else "0", switch: "1"}
    proc = subprocess.run([str(driver), str(k), str(m), str(n), "2"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.startswith("skip"), proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("nmse="))
    return dict(item.split("=") for item in line.split())


# Units of 16 channels in pairs and alone (M = 16; M = 48: a pair and a single unit on 2 threads), row tails (33, 37,
# 100: a partial tile and zero rows, its sums kept aside between slabs), passes of 1 and 2 row tiles (32 to 200 rows),
# one block and many, one slab of the k range and several (K = 4096 at 64 and 100 rows: 2 and 4 slabs; K = 14336 at
# 33 rows: 6), where C goes back to dst between slabs, and the decoding of the next pair or slab during a pass (one
# pair a thread: M = 32).
TILE_SHAPES = [(256, 16, 32), (512, 64, 37), (4096, 48, 64), (4096, 32, 100), (256, 16, 200), (14336, 32, 33)]


@needs_kernels
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("k,m,n", TILE_SHAPES)
def test_q4k_tiles_on_emulated_tiles_within_the_rounding_bound(q4k_tiles_driver, k, m, n):
    """The Q4_K product on AMX tiles (emulated) against W decoded by ggml times x in double, on random
    blocks (every bit pattern of quants, scales and mins) in ggml's repacked layout: every output within
    2^-8 sum |w x| (two BF16 roundings per term) plus the F32 summation's K 2^-24 (tests/c/tile_bound.h's
    bound_ratio <= 1), over TILE_SHAPES. A wrong pair, channel, sub-block scale or min, or a lost slab, is off by
    O(|y|), far past the bound (here the ratio stays below 0.25)."""
    fields = tiles_fields(q4k_tiles_driver, k, m, n, emulate=True)
    assert float(fields["bound_ratio"]) <= 1.0 and float(fields["plain_nmse"]) <= 1e-10, fields


@needs_kernels
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("k,m,n", TILE_SHAPES)
def test_q6k_tiles_on_emulated_tiles_within_the_rounding_bound(q6k_tiles_driver, k, m, n):
    """The Q6_K product on AMX tiles (emulated) against W decoded by ggml times x in double, on random blocks (every
    bit pattern of ql, qh and the int8 scales) in the file layout: the bound and shapes of the Q4_K test. A channel
    or pair in the wrong place of the transposed tile, a wrong nibble, high-bit pair or 16-weight scale, is off by
    O(|y|) (here the ratio stays below 0.25)."""
    fields = tiles_fields(q6k_tiles_driver, k, m, n, emulate=True, switch="QMM_Q6K_TILES")
    assert float(fields["bound_ratio"]) <= 1.0, fields


@pytest.mark.skipif(not AMX, reason="this CPU (or its OS) has no AMX-BF16 tiles: the hardware paths are checked on "
                                    "emulated tiles only (test_q4k_tiles_on_emulated_tiles_within_the_rounding_bound, "
                                    "test_q6k_tiles_on_emulated_tiles_within_the_rounding_bound)")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("kind", ["q4k", "q6k"])
@pytest.mark.parametrize("k,m,n", [(512, 64, 37), (4096, 48, 64), (14336, 32, 200)])
def test_tile_products_on_amx_hardware_within_the_rounding_bound(request, kind, k, m, n):
    driver = request.getfixturevalue(f"{kind}_tiles_driver")
    fields = tiles_fields(driver, k, m, n, emulate=False, switch=f"QMM_{kind.upper()}_TILES")
    assert float(fields["bound_ratio"]) <= 1.0, fields


PREFILL_PATHS = [  # conversion, an op of its tile path in the profile, (op_paths key, text without "emulated...")
    # the quantized products' BF16 rows: 40 padded to 48, and a slack row to start them on a cache line
    ("q4_k", "CUSTOM bf16[256,49,1]", ("text matrices", "Q4_K kernel (x86 AMX tiles")),
    ("q6_k", "CUSTOM bf16[256,49,1]", ("text matrices q6_K in the file layout",
                                       "prefill from 32 rows: mllama Q6_K kernel (x86 AMX tiles")),
    ("q6_k", "CUSTOM bf16[64,256,1]", ("text matrices in the file layout, prefill",
                                       "from 32 rows, up to 512 MiB as BF16: BF16, or quantized decoded to BF16, "
                                       "for mllama BF16 GEMM (x86 AMX tiles")),
    # the BF16 weights' packed panels (8192 int32) and 64 bytes to align them
    ("bf16", "CUSTOM i32[8208,1,1] x bf16", ("text matrices in the file layout, prefill", "(x86 AMX tiles"))]


def assert_prefill_on_tiles_matches_ggml(converted, monkeypatch, tmp_path, model, profiled, path, emulate: bool):
    monkeypatch.setenv("MLLAMA_AMX_EMULATE", "1" if emulate else "0")
    prompt = [128000] + [(9906 + 37 * i) % 20000 + 300 for i in range(39)]
    logits = {}
    for kernels in ("amx", "0"):
        monkeypatch.setenv("MLLAMA_CPU_KERNELS", kernels)
        with mllama.Model(converted(model), n_ctx=128, profile=str(tmp_path / f"{kernels}.tsv")) as m:
            logits[kernels] = m.engine.evaluate(prompt, [], all_logits=True)
            if kernels == "amx":
                line = m.op_paths()[path[0]]
                assert path[1] + (", emulated" if emulate else ")") in line, line
    assert logits["amx"].shape == (40, logits["0"].shape[1]) and np.all(np.isfinite(logits["amx"]))
    bound = 1e-6 if model == "bf16" else 2e-3
    assert 0 < nmse(logits["amx"], logits["0"]) <= bound, nmse(logits["amx"], logits["0"])
    assert profiled in (tmp_path / "amx.tsv").read_text()


@needs_kernels
@pytest.mark.parametrize("model,profiled,path", PREFILL_PATHS)
def test_prefill_on_emulated_amx_tiles_matches_ggml(converted, monkeypatch, tmp_path, model, profiled, path):
    """A 40-token prefill (all logits) on emulated AMX tiles against ggml's ops alone: the q4_k conversion's
    ffn_down matrices (Q4_K, repacked by ggml) take the Q4_K tile product (its rows in BF16: 40 padded to 48,
    profiled), the q6_k conversion's (Q6_K) the Q6_K tile product (the same), and its other matrices (Q8_0) are
    decoded to BF16 for the tile GEMM (the ffn_gate's and ffn_up's copies, K = n_embd = 64 by n_ff = 256, packed:
    profiled); op_paths names each path. The bound: the paths differ from ggml's by ggml's rounding of the rows to 8
    bits (Q8_K, Q8_0: per element at most 1/254 of its block's largest value, which is at most sqrt(256) = 16 times
    the block's rms: an error energy of at most 256 / (3 x 254^2) = 1.3e-3 of the rows', uniform rounding) and their
    own BF16 roundings (2^-8 relative, 1.5e-5 in energy); the products are one part of each layer's residual update,
    so the logits' NMSE stays below 2e-3 (measured 4-8e-4 here). A wrong channel, pair or scale gives O(1). The bf16
    conversion's matrices go to the tile GEMM as they are (the ffn_down's packed panels, 256 / 2 pairs x 64 channels,
    profiled): the same BF16 products as ggml's (which rounds the rows to BF16 too), summed in another order, so
    1e-6."""
    assert_prefill_on_tiles_matches_ggml(converted, monkeypatch, tmp_path, model, profiled, path, emulate=True)


@needs_kernels
@pytest.mark.parametrize("n_tokens,on_tiles", [(24, False), (40, True)])
def test_q6k_prefill_takes_the_q6k_tile_product_from_32_rows(converted, monkeypatch, tmp_path, n_tokens, on_tiles):
    """With every kernel on (emulated tiles), a Q6_K matrix takes the Q6_K tile product from k_q6k_tiles_min_rows
    (32) rows, and below our Q6_K kernel; it is never decoded whole to BF16 for the tile GEMM (which took ~94 ms
    for an 11B ffn_down on a 2-core AMX Xeon, against 25 ms for a 64-row product in our Q6_K kernel and 13 in the
    tile product). The q6_k conversion's ffn_down (K = 256 by 64): its tile product's rows ("CUSTOM bf16[256,49,1]":
    40 rows padded to 48, and a slack row) only in the 40-token prefill, its decoded copy's packing
    ("CUSTOM bf16[256,64,1]") in neither; both prefills' logits match ggml's within
    test_prefill_on_emulated_amx_tiles_matches_ggml's bound, and the tile product's differ from them (its BF16
    roundings)."""
    monkeypatch.setenv("MLLAMA_AMX_EMULATE", "1")
    prompt = [128000] + [(9906 + 37 * i) % 20000 + 300 for i in range(n_tokens - 1)]
    logits = {}
    for kernels in ("", "0"):
        monkeypatch.setenv("MLLAMA_CPU_KERNELS", kernels) if kernels else monkeypatch.delenv("MLLAMA_CPU_KERNELS",
                                                                                             raising=False)
        with mllama.Model(converted("q6_k"), n_ctx=128, profile=str(tmp_path / f"k{kernels}.tsv")) as m:
            logits[kernels] = m.engine.evaluate(prompt, [], all_logits=False)
    profile = (tmp_path / "k.tsv").read_text()
    assert ("CUSTOM bf16[256,49,1]" in profile) == on_tiles and "CUSTOM bf16[256,64,1]" not in profile, profile
    # below 32 rows our Q6_K kernel computes ggml's own sums (the same Q8_K rows): 0 here, within the bound anywhere
    assert (0 < nmse(logits[""], logits["0"]) or not on_tiles) and nmse(logits[""], logits["0"]) <= 2e-3


@pytest.mark.skipif(not AMX, reason="this CPU (or its OS) has no AMX-BF16 tiles: the hardware path is checked on "
                                    "emulated tiles only (test_prefill_on_emulated_amx_tiles_matches_ggml)")
@pytest.mark.parametrize("model,profiled,path", PREFILL_PATHS)
def test_prefill_on_amx_hardware_matches_ggml(converted, monkeypatch, tmp_path, model, profiled, path):
    """The same on the hardware tiles, inside the model's graph on ggml's threads."""
    assert_prefill_on_tiles_matches_ggml(converted, monkeypatch, tmp_path, model, profiled, path, emulate=False)
