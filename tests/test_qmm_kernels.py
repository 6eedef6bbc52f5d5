"""The quantized decode kernels (qmm): the Q6_K products in the file layout (csrc/kernels/x86/qmm_q6k.cpp on
AVX-512 VNNI, qmm_q6k_avx2.cpp on AVX2) and the Q4_K ones on ggml's repacked layout (qmm_q4k_avx512.cpp,
qmm_q4k_avx2.cpp), each form against ggml's mul_mat on the same weights (tests/c/qmm_q6k.cpp,
tests/c/qmm_q4k.cpp) and inside the model against ggml's ops alone; the threads' sharing of their work
(csrc/kernels/work_chunks.h, tests/c/work_chunks.cpp)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mllama
from mllama._native.cpu_features import ggml_features
from mllama.generation.engine import Part
from test_cpu_kernels import ROOT, build_kernel_driver, nmse

VNNI = ggml_features().get("AVX512_VNNI_KERNELS") == "1"
AVX2 = ggml_features().get("AVX2_KERNELS") == "1"
# The kernel's two forms: AVX-512 VNNI where the CPU has it; AVX2 on any x86 with AVX2 (MLLAMA_AVX512=0
# makes an AVX-512 CPU take it).
QMM_FORMS = [pytest.param("avx512_vnni", marks=pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI")),
             pytest.param("avx2", marks=pytest.mark.skipif(not AVX2, reason="this build or CPU has no AVX2 kernels"))]


def qmm_form_env(form: str, prefetch_l1: str | None = None) -> dict:
    env = {**os.environ, "MLLAMA_AVX512": "0"} if form == "avx2" else dict(os.environ)
    return env if prefetch_l1 is None else {**env, "MLLAMA_PREFETCH_L1": prefetch_l1}


# The quantized kernels' AVX-512 forms prefetch their weights into L2 only or into L1 too, by the CPU
# (weights_prefetch_l1, q6k_weights_prefetch_l1 in kernels/dispatch.h); MLLAMA_PREFETCH_L1 picks either on any
# CPU, so both variants are checked everywhere (the AVX2 forms have one).
PREFETCH_FORMS = [pytest.param("avx512_vnni", "0", marks=QMM_FORMS[0].marks),
                  pytest.param("avx512_vnni", "1", marks=QMM_FORMS[0].marks),
                  pytest.param("avx2", None, marks=QMM_FORMS[1].marks)]


def build_qmm_driver(out: Path) -> Path:
    """tests/c/qmm_q6k.cpp with the kernel's sources alone (bench/qmm.py too)."""
    return build_kernel_driver(out, "qmm_q6k", ["qmm_q6k"])


@pytest.fixture(scope="module")
def qmm_driver(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    return build_qmm_driver(tmp_path_factory.mktemp("qmm") / "qmm_q6k")


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("form,prefetch_l1", PREFETCH_FORMS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 64])
@pytest.mark.parametrize("k,m,threads", [(256, 1, 2), (512, 7, 2), (4096, 33, 2), (1024, 100, 3), (14336, 67, 2)])
def test_q6k_kernel_matches_ggml_mul_mat(qmm_driver, k, m, threads, rows, form, prefetch_l1):
    """The kernel against ggml's mul_mat on the same random Q6_K blocks (every bit pattern, scales of
    -128 included) and the same F32 rows (one 256-block all zeros), on 2 or 3 threads. Both quantize x to
    8-bit blocks with ggml's Q8_K rule (the kernel reproduces it: scale -127/max, round half to even),
    and both sum each block exactly in int32 (at most 16 * 63 * 127 per 16 weights, 2^31 far away), so
    the integer block sums are equal; only the float sums differ in order: ggml adds d * sumi per
    block in 8 lanes, the kernel d * (scale * sub-block sum) in 16 (the AVX2 form: d * sumi in 8 lanes,
    with the scales in the integer sums as ggml's AVX2 code has them, which may round past 2^24). That is a
    few float roundings (2^-24 relative) per output, an NMSE of ~1e-14 (measured: up to 1.8e-13 at K =
    14336; 0 for the AVX2 form), so 1e-10 holds with room, and a wrong quantization (one int8 off by 1 in
    a block: ~1e-6) would not pass. K = 14336 with 5 and 8 rows takes the rows in two passes over each chunk of
    channels in the AVX2 form (q6k::rows_per_pass: 18 KB of activations per row); 9, 17 and 64 rows (prefill)
    go in even passes of at most 8 (5 + 4, 6 + 6 + 5, 8 x 8), so a pass that skips or repeats a row shows;
    the threads claim the channels in chunks (work::chunks_of: M = 67 in chunks of 9 channels, M = 100 in
    chunks of 9 for 3 threads), so a chunk left out or a thread's write lost shows as a wrong channel. The AVX-512
    form runs with and without its L1 prefetches (PREFETCH_FORMS)."""
    proc = subprocess.run([str(qmm_driver), str(k), str(m), str(rows), str(threads)], capture_output=True, text=True,
                          timeout=120, env=qmm_form_env(form, prefetch_l1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.startswith("skip"), proc.stdout
    fields = dict(item.split("=") for item in proc.stdout.split())
    assert float(fields["nmse"]) <= 1e-10, proc.stdout


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_work_chunks_each_claimed_once_owners_in_order(tmp_path):
    """The products' work sharing under real threads (1-40 of them, 1-1000 chunks, uneven progress, one thread
    starting only after the others are done): every chunk claimed exactly once, each segment's owner taking its
    chunks from the front in order before any other's, the late thread finding nothing left. Off-by-one slips
    in the claims (a chunk taken twice or never, an owner skipping) fail it (checked by mutation)."""
    exe = tmp_path / "work_chunks"
    subprocess.run(["c++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "c" / "work_chunks.cpp"), "-o", str(exe)], check=True, capture_output=True,
                   text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stdout + proc.stderr


def qmm_run(path, monkeypatch, kernels: str, profile: Path | None = None):
    """Logits of a 12-token prefill (more than 8 rows: passes), of 6 single-token steps, of a 5-token
    prompt in a second sequence (5 rows: the kernel), of 2 sequences stepped together, and 16 greedy
    tokens."""
    monkeypatch.setenv("MLLAMA_CPU_KERNELS", kernels)
    prompt = [128000, 9906, 1917, 11, 1268, 527, 499, 30, 358, 1097, 7060, 13]
    with mllama.Model(path, n_seq_max=2, n_ctx=128, profile=str(profile) if profile else None) as m:
        engine = m.engine
        logits = [engine.evaluate(prompt, [])]
        for token in (40, 1097, 264, 1296, 315, 279):
            logits.append(engine.step(token, 0))
        logits.append(engine.evaluate(prompt[:5], [], seq=1))
        logits.extend(engine.decode([Part(s, [791], len(engine.seqs[s].tokens), [], engine.rows_for(s, [791]), [0])
                                     for s in (0, 1)]))
        tokens = list(m.generate_tokens(prompt, max_tokens=16, temperature=0))
    return np.stack(logits), tokens


@pytest.mark.parametrize("form", QMM_FORMS)
def test_q6k_kernel_in_the_model_matches_ggml(converted, monkeypatch, tmp_path, form):
    """The q6_k conversion (its ffn_down matrices are Q6_K: K = n_ff = 256) decoding with the kernel
    and with ggml's ops alone. Until the first Q6_K product both runs compute the same ops; its output
    differs only in float summation order (NMSE ~1e-14, the test above). Downstream, that may flip a
    rounding of the next 8-bit quantization of activations (Q8_K, and Q8_0 for the q8_0 matrices): one
    int8 off by one in a block of 32..256 changes that product by at most 1/127 of the block's largest
    input, an NMSE of ~1e-6 per flip at most. Measured here: 0 (K = 256 is one block per output, whose
    few float roundings came out the same). The bound, 1e-6, allows one such flip and still fails any
    real error (a wrong sub-block scale: ~1e-2); the profile shows that the kernel ran for every Q6_K product,
    the 12-token prefill's included (passes of 6 rows), and ggml's mul_mat for none."""
    path = converted("q6_k")
    if form == "avx2":
        monkeypatch.setenv("MLLAMA_AVX512", "0")
    ops = assert_qmm_matches_ggml(path, monkeypatch, tmp_path, ["CUSTOM q6_K[256,"])
    assert "MUL_MAT q6_K" not in ops, ops


@pytest.fixture(scope="module")
def q4k_driver(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    return build_kernel_driver(tmp_path_factory.mktemp("q4k") / "qmm_q4k", "qmm_q4k", ["qmm_q4k_avx2", "qmm_q4k_avx512"])


@pytest.mark.parametrize("form,prefetch_l1", PREFETCH_FORMS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("k,m,threads", [(256, 8, 2), (512, 16, 2), (4096, 40, 2), (1024, 96, 3), (14336, 24, 2)])
def test_q4k_kernel_matches_ggml_repacked_mul_mat(q4k_driver, k, m, threads, rows, form, prefetch_l1):
    """The Q4_K kernel on ggml's repacked layout (CPU_REPACK's block_q4_Kx8, ggml's own repacking) against
    ggml's mul_mat on the same tensor, random blocks (every bit pattern of quants and packed 6-bit scales
    and mins) and rows (one 256-block all zeros), 2 or 3 threads (M = 96: 12 groups of 8 channels, claimed in
    chunks of 1 by 3 threads). Both quantize x to the same Q8_K values and
    sum each 32-weight sub-block exactly in integers; they differ only in float summation order (a few
    roundings of 2^-24 per output: NMSE ~1e-14, measured up to 1.3e-13), so 1e-10 holds with room while a
    wrong scale, min, channel or activation offset gives 1e-3 to 0.5 (checked by mutation). ggml's own
    product on the file layout agrees with its repacked one just as closely (plain_nmse). The two forms
    have the same integer sums and float steps: their results are equal bit for bit. The AVX-512 form runs with
    and without its L1 prefetches (PREFETCH_FORMS)."""
    proc = subprocess.run([str(q4k_driver), str(k), str(m), str(rows), str(threads)], capture_output=True, text=True,
                          timeout=120, env=qmm_form_env(form, prefetch_l1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.startswith("skip"), proc.stdout
    assert proc.stdout.startswith(f"form={form.split('_')[0]}\n"), proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("nmse="))
    fields = dict(item.split("=") for item in line.split())
    assert float(fields["nmse"]) <= 1e-10 and float(fields["plain_nmse"]) <= 1e-10, proc.stdout


@pytest.mark.parametrize("form", QMM_FORMS)
@pytest.mark.parametrize("rows", [9, 16, 33, 64, 65, 130])
@pytest.mark.parametrize("k,m", [(256, 8), (4096, 40), (14336, 24)])
def test_q4k_kernel_takes_prefills(q4k_driver, k, m, rows, form):
    """Both forms also take prefills: the AVX-512 form up to 64 rows in one pass over the weights (chunks of 4
    rows per pass over a block), more in even passes of at most 64 (65 = 33 + 32, 130 = 44 + 43 + 43); the AVX2
    form in even passes of at most 8 (9 = 5 + 4, 33 = 7 x 4 + 5 ...), so a pass that skips or repeats a row shows:
    the same check and bound as above."""
    proc = subprocess.run([str(q4k_driver), str(k), str(m), str(rows), "2"], capture_output=True, text=True, timeout=120,
                          env=qmm_form_env(form))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"form={form.split('_')[0]}\n"), proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("nmse="))
    fields = dict(item.split("=") for item in line.split())
    assert float(fields["nmse"]) <= 1e-10 and float(fields["plain_nmse"]) <= 1e-10, proc.stdout


@pytest.mark.parametrize("form", QMM_FORMS)
def test_q4k_kernel_in_the_model_matches_ggml(converted, monkeypatch, tmp_path, form):
    """The q4_k conversion (its ffn_down matrices are Q4_K, K = n_ff = 256, repacked by ggml at load)
    decoding with the kernel and with ggml's ops alone: the same reasoning and bound as the Q6_K kernel's
    model test, the profile shows that the kernel ran (its product reads the 8-bit activations: one
    320-byte block and its 4-byte scale per row for K = 256, after the 256-byte work state of the product
    (kernels/work_chunks.h) and 63 bytes of slack to start the rows on a cache line; the 12-token prefill too,
    ggml's product for none) and op_paths names the form and its rows per pass."""
    if form == "avx2":
        monkeypatch.setenv("MLLAMA_AVX512", "0")
    path = converted("q4_k")
    def activations(rows: int) -> str:
        return f"CUSTOM i8[{256 + (320 + 4) * rows + 63},1,1]"

    ops = assert_qmm_matches_ggml(path, monkeypatch, tmp_path, [activations(1), activations(12)])
    assert "MUL_MAT q4_K" not in ops, ops
    with mllama.Model(path, cpu_kernels="qmm") as model:
        line = model.op_paths()["text matrices"]
    name, rows = ("AVX2", 8) if form == "avx2" else ("AVX512-VNNI", 64)
    assert f"repacked q4_K: mllama Q4_K kernel (x86 {name}) in passes of up to {rows} rows" in line, line


def assert_qmm_matches_ggml(path, monkeypatch, tmp_path, profiled: list[str]):
    """qmm_run with the qmm kernels and with ggml's ops alone: NMSE <= 1e-6, the same greedy tokens, and
    the kernel's run profile holds each of `profiled` (returned)."""
    ours, tokens_ours = qmm_run(path, monkeypatch, "qmm", tmp_path / "qmm.tsv")
    ggml, tokens_ggml = qmm_run(path, monkeypatch, "0")
    assert ours.shape == ggml.shape and np.all(np.isfinite(ours))
    assert nmse(ours, ggml) <= 1e-6, nmse(ours, ggml)
    assert tokens_ours == tokens_ggml and len(tokens_ours) > 0
    ops = (tmp_path / "qmm.tsv").read_text()
    assert all(op in ops for op in profiled), ops
    return ops


def test_q6k_kernel_op_paths(converted):
    """op_paths names the kernel only where it may run: allowed by cpu_kernels (the default allows it)
    and on a CPU with one of its forms (AVX2, AVX-512 VNNI), for a model that has Q6_K text matrices."""
    with mllama.Model(converted("q6_k"), cpu_kernels="0") as model:
        off = model.op_paths()["text matrices q6_K in the file layout"]
    with mllama.Model(converted("q6_k"), cpu_kernels="attn,xattn") as model:
        others = model.op_paths()["text matrices q6_K in the file layout"]
    with mllama.Model(converted("q6_k")) as model:
        default = model.op_paths()["text matrices q6_K in the file layout"]
    with mllama.Model(converted("q6_k"), cpu_kernels="qmm,xattn") as model:
        chosen = model.op_paths()["text matrices q6_K in the file layout"]
    with mllama.Model(converted("f16")) as model:
        none = model.op_paths()["text matrices q6_K in the file layout"]
    assert off.startswith("4, ggml") and others.startswith("4, ggml")
    form = "(x86 AVX512-VNNI)" if VNNI else "(x86 AVX2)"
    assert default.startswith(f"4, mllama Q6_K kernel {form} in passes of up to 8 rows" if VNNI or AVX2
                              else "4, ggml"), default
    assert chosen.startswith(f"4, mllama Q6_K kernel {form}" if VNNI or AVX2 else "4, ggml"), chosen
    assert none == "none in this model"
