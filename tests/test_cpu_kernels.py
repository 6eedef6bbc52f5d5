"""Our CPU kernels (csrc/kernels/) against ggml's generic ops on the same model, the memory
report of a context, and the CPU-feature report behind `mllama info`'s rebuild warning (the quantized
decode kernels: tests/test_qmm_kernels.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import mllama
from mllama._native.cpu_features import cpu_report, ggml_features, warning

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ggml_features().get("AVX512_BF16_KERNELS") == "1"
needs_kernels = pytest.mark.skipif(not KERNELS, reason="this CPU has no AVX-512 BF16")


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def encode(path, monkeypatch, kernels: str | None, n_tiles=4, ar_id=6, dump_dir=None):
    if kernels is None:
        monkeypatch.delenv("MLLAMA_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MLLAMA_CPU_KERNELS", kernels)
    with mllama.Model(path, dump_dir=dump_dir, dump_filter="mm.out|v.blk.0.attn_out" if dump_dir else None) as model:
        hp = model.hparams
        shape = (hp.v_max_tiles, 3, hp.v_image_size, hp.v_image_size)
        pixels = np.random.default_rng(n_tiles).standard_normal(shape).astype(np.float32)
        return model.encode_pixels(pixels, ar_id, n_tiles)


@needs_kernels
@pytest.mark.parametrize("n_tiles,ar_id", [(4, 6), (2, 2), (1, 1)])
def test_bf16_attention_and_gelu_match_ggml_on_half_weights(converted, monkeypatch, n_tiles, ar_id):
    generic = encode(converted("f16"), monkeypatch, "0", n_tiles, ar_id)
    both = encode(converted("f16"), monkeypatch, None, n_tiles, ar_id)
    attn = encode(converted("f16"), monkeypatch, "attn", n_tiles, ar_id)
    gelu = encode(converted("f16"), monkeypatch, "gelu", n_tiles, ar_id)
    exact = encode(converted("f32"), monkeypatch, "0", n_tiles, ar_id)  # the same weights, F32 products
    # BF16 operands with F32 accumulation: ~5e-6 per attention, well inside the F16 parity budget
    assert 0 < nmse(both, generic) <= 2e-5
    assert 0 < nmse(attn, generic) <= 2e-5
    # The kernel's erf is exact to 1.5e-7, over 3000x below the F16 rounding (2^-11) that ggml applies
    # to the next product's input: seen through it, it only flips a few of those roundings, and how
    # many depends on the CPU's summation order. So the bound is the F16 path's own error against the
    # F32 computation, measured in this run: the kernel may add at most a tenth of it.
    f16_error = nmse(generic, exact)
    assert nmse(gelu, generic) <= 0.1 * f16_error, (nmse(gelu, generic), f16_error)
    assert nmse(gelu, exact) <= 1.1 * f16_error


@needs_kernels
def test_bf16_gemm_matches_ggml_on_bf16_weights(converted, monkeypatch, tmp_path):
    path = converted("bf16")
    reference = encode(converted("f32"), monkeypatch, "0")  # the same BF16 values, computed in F32
    generic = encode(path, monkeypatch, "0", dump_dir=tmp_path / "generic")
    gemm = encode(path, monkeypatch, "gemm", dump_dir=tmp_path / "gemm")
    gemm_gelu = encode(path, monkeypatch, "gemm,gelu")
    both = encode(path, monkeypatch, None)
    dumps = {name: np.load(tmp_path / name / "v.blk.0.attn_out.npy") for name in ("gemm", "generic")}
    # Same BF16 operands and F32 accumulation as ggml's product: only the summation order differs.
    # After the first layer (q, k, v, attention, o) that is a few BF16 roundings flipped ...
    assert 0 < nmse(dumps["gemm"], dumps["generic"]) <= 1e-8
    # ... which the following layers amplify (1e-9 .. 1e-6 after the tower, by CPU: ggml's own
    # summation order depends on the CPU it was built for), while both stay as close to the F32
    # computation as each other.
    assert 0 < nmse(gemm, generic) <= 1e-5
    assert nmse(gemm, reference) <= 1.2 * nmse(generic, reference)
    # the projector (68 tokens: a 4-row tail per thread) on those vision outputs
    projected = [np.load(tmp_path / name / "mm.out.npy") for name in ("gemm", "generic")]
    assert 0 < nmse(*projected) <= 1e-5
    assert 0 < nmse(gemm_gelu, generic) <= 1e-5  # + GELU fused into fc1 (erf to 1.5e-7)
    assert 0 < nmse(both, generic) <= 2e-5       # + BF16 attention


@pytest.fixture(scope="module")
def layer_norm_driver(tmp_path_factory):
    return build_kernel_driver(tmp_path_factory.mktemp("layer_norm") / "layer_norm", "layer_norm", ["layer_norm"])


@needs_kernels
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("n,rows,bias", [(1280, 37, 1), (100, 5, 1), (1283, 9, 0), (16, 3, 0), (1, 2, 1)])
def test_fused_layer_norm_within_its_rounding_bound(layer_norm_driver, n, rows, bias):
    """The layer norm fused with the cast to BF16 in front of the GEMMs (csrc/kernels/x86/layer_norm.cpp)
    against the exact norm in double: every output within its F32 sums' error plus the BF16 rounding
    (tests/c/layer_norm.cpp derives the bound). Rows of n % 32 != 0 reach the masked tails; a missing
    mean, weight or bias is off by hundreds of times the bound."""
    proc = subprocess.run([str(layer_norm_driver), str(n), str(rows), str(bias), "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = dict(item.split("=") for item in proc.stdout.split())
    assert fields["type"] == "bf16" and float(fields["ratio"]) <= 1.0, fields


@needs_kernels
def test_f32_weights_keep_exact_attention(gguf_f32, monkeypatch):
    generic = encode(gguf_f32, monkeypatch, "0")
    ours = encode(gguf_f32, monkeypatch, None)
    assert nmse(ours, generic) <= 1e-10  # only the GELU kernel runs; attention stays ggml's F32 path


def test_context_memory_report(small_gguf):
    with mllama.Model(small_gguf, n_ctx=64, n_image_slots=2) as model:
        hp = model.hparams
        before = model.memory()
        model.forward([1, 2, 3])
        after = model.memory()
    kv_dim = hp.n_head_kv * (hp.n_embd // hp.n_head)
    n_cross = len(hp.cross_attention_layers)
    n_self = hp.n_layer - n_cross
    n_vis = hp.v_max_tiles * ((hp.v_image_size // hp.v_patch_size) ** 2 + 1)
    assert before["kv_cache"] == n_self * 2 * 64 * kv_dim * 4  # an F32 model keeps F32 caches
    assert before["image_slots"] == n_cross * 2 * 2 * n_vis * kv_dim * 4
    assert after["compute"] > 0


def test_report_names_features_ggml_leaves_unused():
    info = "CPU: SSE3=1 AVX=1 AVX2=1 F16C=1 FMA=1 | mllama: AVX512_BF16_KERNELS=1"
    report = cpu_report({"avx", "avx2", "f16c", "fma", "avx512f", "avx512_bf16", "sse3"}, info)
    assert report["unused_by_ggml"] == ["AVX512", "AVX512_BF16"]
    assert report["mllama_kernels"] and not report["llamafile"]
    note = warning(report)
    assert note and "AVX512, AVX512_BF16, LLAMAFILE" in note and "GGML_NATIVE=ON" in note


def test_report_is_quiet_for_a_native_build():
    info = "CPU: AVX=1 AVX2=1 F16C=1 FMA=1 AVX512=1 AVX512_BF16=1 LLAMAFILE=1 | mllama: AVX512_BF16_KERNELS=1"
    report = cpu_report({"avx", "avx2", "f16c", "fma", "avx512f", "avx512_bf16"}, info)
    assert report["unused_by_ggml"] == [] and warning(report) is None


def test_report_on_an_amx_cpu_asks_for_ggml_built_with_amx():
    info = ("CPU: AVX=1 AVX2=1 F16C=1 FMA=1 AVX512=1 AVX512_BF16=1 LLAMAFILE=1 | mllama: AVX512_BF16_KERNELS=1 "
            "AMX_TILE_KERNELS=1")
    report = cpu_report({"avx", "avx2", "f16c", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, info)
    assert report["cpu_amx_bf16"] and report["mllama_amx_tiles"]
    assert report["unused_by_ggml"] == ["AMX_INT8"]  # ggml's AMX layout for the text matrices needs a native build
    assert "AMX_INT8" in warning(report)


REPACK = ggml_features().get("REPACK") == "1"
EXTRA_TYPES = {"AMX", "KleidiAI", "CPU_REPACK"}  # ggml's extra CPU buffer types (csrc/model/repack.h)


@pytest.mark.skipif(not REPACK, reason="this ggml has no repacked CPU layouts")
def test_repacked_weights_match_the_mapping(converted, monkeypatch):
    prompt = [128000, 9906, 1917, 11, 1268, 527, 499, 30]
    runs, paths = {}, {}
    for repack in ("1", "0"):
        monkeypatch.setenv("MLLAMA_REPACK", repack)
        with mllama.Model(converted("q4_k")) as model:
            buffers = {t.name: t.buffer for t in model.tensors()}
            paths[repack] = model.op_paths()["text matrices"]
            runs[repack] = (buffers, model.read_tensor("blk.0.ffn_down.weight"), model.forward(prompt),
                            list(model.generate_tokens(prompt, max_tokens=16, temperature=0)))
    (buf_r, w_r, logits_r, toks_r), (buf_m, w_m, logits_m, toks_m) = runs["1"], runs["0"]
    # each weight in the first of ggml's extra types that takes it, ggml's AMX layout only with "amx" (an AMX build
    # on an AMX CPU; csrc/model/repack.h)
    assert buf_r["blk.0.ffn_down.weight"] in EXTRA_TYPES - {"AMX"} and buf_m["blk.0.ffn_down.weight"] not in EXTRA_TYPES
    assert "AMX" not in buf_r.values() and not re.search(r"\bAMX \d", paths["1"])  # (our tile kernels may be named)
    assert buf_r["token_embd.weight"] not in EXTRA_TYPES  # read by rows: stays in the mapping
    counts = {}
    for name in buf_r.values():
        if name in EXTRA_TYPES:
            counts[name] = counts.get(name, 0) + 1
    assert all(f"{name} {n}" in paths["1"] for name, n in counts.items()), (paths["1"], counts)
    assert paths["0"].endswith("in ggml's extra CPU layouts: none")
    np.testing.assert_array_equal(w_r, w_m)            # read back from the file, not the repacked buffer
    assert nmse(logits_r, logits_m) <= 1e-6
    assert toks_r == toks_m


def decode_cross_attention(converted, monkeypatch, tmp_path, kernels: str):
    """The f16 model (F16 image caches) with an image: logits of a 20-token prefill and of one step (the kernel
    takes both; it took up to 16 tokens before prefill came to it), and the cross-attention layers' outputs."""
    from mllama.generation.engine import PreparedImage

    monkeypatch.setenv("MLLAMA_CPU_KERNELS", kernels)
    with mllama.Model(converted("f16"), n_ctx=64, n_image_slots=1, dump_dir=tmp_path / kernels, dump_filter="cross_out") as m:
        assert (kernels != "0") == m.op_paths()["cross-attention"].startswith("mllama")
        hp = m.hparams
        shape = (hp.v_max_tiles, 3, hp.v_image_size, hp.v_image_size)
        image = PreparedImage(np.random.default_rng(0).standard_normal(shape).astype(np.float32), 6, 4, "x")
        m.engine.encode(0, image)
        prefill = np.asarray(m.engine.evaluate([128000, 128256, *range(1, 19)], [image]))
        step = np.asarray(m.engine.step(7, 1))
        outs = {p.name: np.load(p) for p in sorted((tmp_path / kernels).glob("*cross_out.npy"))}
    return prefill, step, outs


def assert_cross_attention_matches_ggml(converted, monkeypatch, tmp_path):
    prefill_ggml, step_ggml, outs_ggml = decode_cross_attention(converted, monkeypatch, tmp_path, "0")
    prefill_ours, step_ours, outs_ours = decode_cross_attention(converted, monkeypatch, tmp_path, "xattn")
    assert len(outs_ggml) == 2 and outs_ggml.keys() == outs_ours.keys()
    for name in outs_ggml:  # ggml rounds q to F16 before the dot products; we keep F32
        assert 0 < nmse(outs_ours[name], outs_ggml[name]) <= 1e-5
    assert 0 < nmse(prefill_ours, prefill_ggml) <= 1e-5
    assert 0 < nmse(step_ours, step_ggml) <= 1e-5


@needs_kernels
def test_decode_cross_attention_kernel_matches_ggml(converted, monkeypatch, tmp_path):
    """F16 caches (the f16 model): decoding and prefill take our GQA kernel for the cross-attention layers
    (the AVX2 form: tests/test_avx2_kernels.py)."""
    assert_cross_attention_matches_ggml(converted, monkeypatch, tmp_path)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("x86_kernels", ["auto", "0"])
def test_no_cpu_kernel_on_a_gpu_context(tmp_path, x86_kernels):
    """The placement rule (kernels/dispatch.h) as a unit: compiled with dispatch.cpp alone, as this
    machine builds it and as a build without the x86 kernels (any other processor) does."""
    exe = tmp_path / "kernel_placement"
    define = [] if x86_kernels == "auto" else [f"-DMLLAMA_X86_KERNELS={x86_kernels}"]
    subprocess.run(["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", *define,
                    f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "tests" / "c" / "kernel_placement.cpp"),
                    str(ROOT / "csrc" / "kernels" / "dispatch.cpp"), str(ROOT / "csrc" / "common" / "error.cpp"),
                    str(ROOT / "csrc" / "common" / "text.cpp"), "-o", str(exe)], check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout
    if x86_kernels == "0":
        assert "available: 0" in proc.stdout


def test_op_paths_name_the_kernels_the_context_uses(converted):
    with mllama.Model(converted("f16"), cpu_kernels="0") as model:
        generic = model.op_paths()
    with mllama.Model(converted("f16")) as model:
        default = model.op_paths()
    assert generic["device"].startswith("CPU") and all("mllama" not in path for path in generic.values())
    features = ggml_features()  # the vision attention (F16 vision weights here) and xattn have AVX2 forms too
    family = ("(x86 AMX tiles)" if features.get("AMX_TILE_KERNELS") == "1" else "(x86 AVX512-BF16)" if KERNELS
              else "(x86 AVX2)" if features.get("AVX2_KERNELS") == "1" else None)
    assert default["cross-attention"].startswith("mllama" if family else "ggml")
    # the cross-attention has an AVX-512 form (F32 FMAs) and an AVX2 one
    xattn_form = "(x86 AVX2)" if family == "(x86 AVX2)" else "(x86 AVX-512)"
    assert family is None or default["cross-attention"].endswith(xattn_form), default["cross-attention"]
    # its AVX2 form reads the image caches head-major (runtime/context.h); ggml's attention, key-major
    assert ("head-major" in default["cross-attention"]) == (xattn_form == "(x86 AVX2)" and family is not None)
    assert "head-major" not in generic["cross-attention"]
    # the self-attention over the F16 caches takes the same kernel, its AVX2 form over head-major caches too
    layout = ", head-major " if xattn_form == "(x86 AVX2)" else " "
    assert default["self-attention"] == ("mllama GQA kernel over the F16 caches" + layout + xattn_form if family
                                         else generic["self-attention"])
    assert generic["self-attention"].endswith("flash_attn_ext")
    assert default["vision attention"].startswith("mllama" if family else "ggml")
    assert family is None or default["vision attention"].endswith(family), default["vision attention"]
    assert default["vision linear layers"].startswith("ggml")  # the BF16 GEMM wants BF16 weights
    assert default["image cross-attention K/V"].startswith("ggml")  # so does its cross K/V path (and F16 stays F16)


def kernel_options(stems: list[str]) -> dict[str, list[str]]:
    """csrc/kernels/x86/compile_options.txt: each kernel source's own options (an option line names its sources, or
    none: all of them)."""
    scoped: dict[str, list[str]] = {}
    for line in (ROOT / "csrc" / "kernels" / "x86" / "compile_options.txt").read_text().splitlines():
        if line.startswith("-"):
            option, *named = line.split()
            assert set(named) <= set(stems), f"compile_options.txt names a source that does not exist: {named}"
            for stem in named or stems:
                scoped.setdefault(stem, []).append(option)
    return scoped


def build_kernel_driver(out: Path, driver: str, kernels: list[str], defines: Sequence[str] = (),
                        replace: dict[str, Path] | None = None) -> Path:
    """tests/c/DRIVER.cpp with the kernels' sources (csrc/kernels/; `kernels`: the ones it tests), against the
    loaded ggml; `defines` ("NAME=VALUE": tuning constants) and `replace` (a kernel's file name without .cpp ->
    another source in its place) are for bench/amx_sweep.sh's variants."""
    import libggml

    ggml = Path(libggml.__file__).parent
    lib_dir = next(p for p in (ggml / "lib", ggml / "lib64") if (p / "libggml-base.so").exists())
    # every kernel source: kernels/dispatch.cpp picks among all of them (kernels/x86/entry_points.h)
    originals = sorted((ROOT / "csrc" / "kernels" / "x86").glob("*.cpp"))
    assert all(ROOT / "csrc" / "kernels" / "x86" / f"{k}.cpp" in originals for k in kernels), kernels
    x86 = [(replace or {}).get(path.stem, path) for path in originals]
    # MLLAMA_SANITIZE (as for the package's build, README "Robustness"): the drivers built with the same sanitizers,
    # every finding fatal, so that a driver test fails on it instead of printing to a captured stderr
    sanitize = os.environ.get("MLLAMA_SANITIZE", "")
    common = ["c++", "-std=c++17", "-O3", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
              # GCC 12's own intrinsic headers trip -Wuninitialized (`__m512 __Y = __Y;`): not our code
              "-Wno-uninitialized", "-Wno-maybe-uninitialized",
              *([f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"] if sanitize else []),
              *(f"-D{d}" for d in defines), f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}",
              f"-I{ggml / 'include'}"]
    # the kernels' own options, as CMakeLists.txt compiles them: a source with options of its own becomes an object
    scoped = kernel_options([path.stem for path in originals])
    objects = []
    for original, path in zip(originals, x86):
        if scoped.get(original.stem):
            objects.append(out.parent / f"{out.name}-{original.stem}.o")
            subprocess.run([*common, *scoped[original.stem], "-c", str(path), "-o", str(objects[-1])], check=True,
                           capture_output=True, text=True)
    plain = [path for original, path in zip(originals, x86) if not scoped.get(original.stem)]
    sources = [ROOT / "tests" / "c" / f"{driver}.cpp", *plain, ROOT / "csrc" / "kernels" / "dispatch.cpp",
               ROOT / "csrc" / "common" / "error.cpp", ROOT / "csrc" / "common" / "text.cpp"]
    subprocess.run([*common, *map(str, sources), *map(str, objects), f"-L{lib_dir}", "-lggml-cpu", "-lggml-base",
                    f"-Wl,-rpath,{lib_dir}", "-o", str(out)], check=True, capture_output=True, text=True)
    return out
