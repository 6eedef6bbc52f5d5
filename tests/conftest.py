"""Shared fixtures: a tiny random-weight Llama 3.2 Vision checkpoint with the real Llama 3
tokenizer (tests/fixtures/tiny_checkpoint.py), built once per test session, and its conversions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fixtures"))
sys.path.insert(0, str(HERE))

# MLLAMA_TEST_KERNELS=FAMILY runs the suite with one kernel family forced on every Model that does
# not choose its own (tests of one kernel set MLLAMA_CPU_KERNELS themselves): "ggml" (ggml's ops
# only), "avx2" (the kernels' AVX2 forms, MLLAMA_AVX512=0: what a CPU without AVX-512 runs),
# "avx512_bf16" (mllama's x86 kernels without AMX tiles) or "amx" (all of them, the vision GEMMs on AMX
# tiles); every test skips, with the reason, on a machine without the family's kernels.
# Unset: the default, every kernel the machine has. (The AMX paths' logic also runs on emulated tiles
# on any AVX-512 BF16 machine: tests/test_cpu_kernels.py.)
KERNEL_FAMILIES = {"ggml": "0", "avx2": "attn,gemm,gelu,xattn,qmm", "avx512_bf16": "attn,gemm,gelu,xattn,qmm", "amx": "1"}
FAMILY_NEEDS = {"avx2": ("AVX2_KERNELS", "this build or CPU has no AVX2 kernels (x86-64 with AVX2, FMA, F16C)"),
                "avx512_bf16": ("AVX512_BF16_KERNELS", "this build or CPU has no AVX-512 BF16 kernels"),
                "amx": ("AMX_TILE_KERNELS", "this build, CPU or OS has no AMX-BF16 tiles")}


def pytest_configure(config):
    # The suite tests the CPU paths wherever it runs: a Model that names no device stays on the CPU, also on a
    # machine with a GPU (tests/test_gpu.py names its devices); MLLAMA_DEVICE set outside says otherwise.
    os.environ.setdefault("MLLAMA_DEVICE", "cpu")
    family = os.environ.get("MLLAMA_TEST_KERNELS")
    if family and family not in KERNEL_FAMILIES:
        raise pytest.UsageError(f"MLLAMA_TEST_KERNELS={family}: choose one of {', '.join(KERNEL_FAMILIES)}")
    if family:
        os.environ["MLLAMA_CPU_KERNELS"] = KERNEL_FAMILIES[family]
    if family == "avx2":
        os.environ["MLLAMA_AVX512"] = "0"


def pytest_collection_modifyitems(config, items):
    family = os.environ.get("MLLAMA_TEST_KERNELS")
    if family not in FAMILY_NEEDS:
        return
    from mllama._native.cpu_features import ggml_features

    feature, why = FAMILY_NEEDS[family]
    if ggml_features().get(feature) != "1":
        skip = pytest.mark.skip(reason=f"MLLAMA_TEST_KERNELS={family}: {why}")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    from tiny_checkpoint import build_checkpoint

    out = tmp_path_factory.mktemp("hf") / "tiny-mllama"
    build_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="session")
def hf_weights(hf_dir) -> dict:
    """The checkpoint's tensors as float32 numpy arrays, by hub name."""
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def converted(hf_dir, tmp_path_factory):
    """convert(type) -> path, cached per type for the session."""
    import mllama

    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("gguf")

    def get(type_name: str) -> Path:
        if type_name not in cache:
            cache[type_name] = mllama.convert(hf_dir, folder / f"tiny-{type_name}.gguf", type=type_name)
        return cache[type_name]

    return get


@pytest.fixture(scope="session")
def gguf_f32(converted) -> Path:
    return converted("f32")


@pytest.fixture(scope="session")
def small_gguf(gguf_f32, tmp_path_factory) -> Path:
    """The f32 fixture without its 128K-token vocabulary: quick to rewrite, loads the same way."""
    from gguf_edit import rewrite

    tok = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template"}
    return rewrite(gguf_f32, tmp_path_factory.mktemp("small") / "small.gguf", drop_keys=tok)


@pytest.fixture(scope="session")
def api_server(gguf_f32):
    """One live `mllama serve --ctx 1024 --parallel 2` on the F32 fixture, shared by the API test modules
    (tests/test_server_api.py, tests/test_logprobs_routes.py): its base URL."""
    from test_server import running

    with running(gguf_f32, "--ctx", "1024", "--parallel", "2") as base:
        yield base
