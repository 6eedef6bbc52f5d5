"""ARM64 parity: the aarch64 cross build (.ci/aarch64.sh -> build/aarch64/) run under qemu-user gives the
vision features, the logits and the greedy tokens of the x86 build, through the same C driver
(tests/c/parity.c) on the tiny F32 fixture.

Skipped when build/aarch64/parity is missing, unless MLLAMA_REQUIRE_AARCH64=1 (CI sets it): then a
missing build, qemu or compiler is a failure, so the check can never be skipped silently."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mllama

ROOT = Path(__file__).resolve().parents[1]
HEADER_DIR = ROOT / "csrc" / "include"
DRIVER_SRC = Path(__file__).parent / "c" / "parity.c"
AARCH64_DIR = ROOT / "build" / "aarch64"
AARCH64_DRIVER = AARCH64_DIR / "parity"
SYSROOT = Path("/usr/aarch64-linux-gnu")
PROMPT = "<|begin_of_text|><|image|>Describe this picture in one word:"
N_STEPS = 16
REQUIRED = os.environ.get("MLLAMA_REQUIRE_AARCH64") == "1"


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"MLLAMA_REQUIRE_AARCH64=1 but {reason} (run: bash .ci/aarch64.sh)")
    pytest.skip(f"{reason} (bash .ci/aarch64.sh builds it)")


@pytest.fixture(scope="session")  # session: checked before the (session) model fixture is built
def qemu() -> str:
    if not AARCH64_DRIVER.is_file():
        _unavailable(f"{AARCH64_DRIVER.relative_to(ROOT)} is missing")
    exe = shutil.which("qemu-aarch64")
    if exe is None:
        _unavailable("qemu-aarch64 is not installed")
    if not (SYSROOT / "lib").is_dir():
        _unavailable(f"the aarch64 runtime ({SYSROOT}) is not installed")
    if shutil.which("cc") is None:
        _unavailable("no C compiler (cc) for the x86 driver")
    return exe


def _run(cmd: list[str], out_dir: Path, env: dict | None = None) -> dict[str, np.ndarray]:
    out_dir.mkdir()
    proc = subprocess.run([*cmd, str(out_dir)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (cmd[0], proc.returncode, proc.stdout, proc.stderr)
    return {"features": np.fromfile(out_dir / "features.f32", dtype=np.float32),
            "logits": np.fromfile(out_dir / "logits.f32", dtype=np.float32),
            "tokens": np.fromfile(out_dir / "tokens.i32", dtype=np.int32)}


def test_aarch64_matches_x86(qemu, gguf_f32, tmp_path, record_property):
    # the inputs, prepared by the x86 package
    rgb = np.random.default_rng(7).integers(0, 256, (100, 100, 3), dtype=np.uint8)  # 2x2 tiles at 56 px
    with mllama.Model(gguf_f32, device="cpu") as model:
        pre = mllama.preprocess(Image.fromarray(rgb), model)
        tokens = model.tokenize(PROMPT, special=True)
        hp = model.hparams
    assert pre.n_tiles == 4 and tokens.count(hp.image_token_id) == 1
    pixels, prompt = tmp_path / "pixels.f32", tmp_path / "prompt.i32"
    np.ascontiguousarray(pre.pixel_values, dtype=np.float32).tofile(pixels)
    np.asarray(tokens, dtype=np.int32).tofile(prompt)
    args = [str(gguf_f32), str(pixels), str(pre.aspect_ratio_id), str(pre.n_tiles), str(prompt), str(N_STEPS)]

    # x86: the driver against the installed package's libmllama
    package_dir = Path(mllama.__file__).parent
    x86_driver = tmp_path / "parity-x86"
    subprocess.run(["cc", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", str(DRIVER_SRC),
                    f"-I{HEADER_DIR}", f"-L{package_dir}", "-lmllama", f"-Wl,-rpath,{package_dir}", "-o", str(x86_driver)],
                   check=True, capture_output=True, text=True)
    x86 = _run([str(x86_driver), *args], tmp_path / "x86")

    # aarch64: the cross build under qemu-user (libraries beside the driver; LD_LIBRARY_PATH as well)
    env = dict(os.environ, LD_LIBRARY_PATH=str(AARCH64_DIR))
    arm = _run([qemu, "-L", str(SYSROOT), str(AARCH64_DRIVER), *args], tmp_path / "aarch64", env=env)

    n_rows = len(tokens) + N_STEPS
    assert x86["features"].size == arm["features"].size == hp.v_max_tiles * hp.v_n_positions * hp.v_output_dim
    assert x86["logits"].size == arm["logits"].size == n_rows * hp.n_vocab
    assert np.isfinite(arm["features"]).all() and np.isfinite(arm["logits"]).all()
    features_nmse = nmse(arm["features"], x86["features"])
    logits_nmse = nmse(arm["logits"], x86["logits"])
    same_tokens = np.array_equal(arm["tokens"], x86["tokens"])
    report = (f"aarch64 vs x86: features NMSE {features_nmse:.3g}, logits NMSE {logits_nmse:.3g} "
              f"({n_rows} rows), greedy tokens {'identical' if same_tokens else 'DIFFERENT'} "
              f"({N_STEPS}: {arm['tokens'].tolist()})")
    print("\n" + report)
    record_property("features_nmse", features_nmse)
    record_property("logits_nmse", logits_nmse)
    record_property("tokens_identical", same_tokens)
    assert features_nmse <= 1e-6, report
    assert logits_nmse <= 1e-6, report
    assert x86["tokens"].size == N_STEPS and same_tokens, (x86["tokens"].tolist(), arm["tokens"].tolist())
