"""What can be checked here of the builds on other machines: every C++ source of the core compiles
with clang (macOS's compiler) with warnings as errors, as CMake builds it. The aarch64 build itself
is checked by tests/test_aarch64.py; the public header as plain C by tests/test_abi.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libggml
import pytest

ROOT = Path(__file__).resolve().parents[1]
GGML_INCLUDE = Path(libggml.__file__).parent / "include"


@pytest.mark.skipif(shutil.which("clang++") is None and not os.environ.get("MLLAMA_REQUIRE_CLANG"),
                    reason="no clang++ (.ci/run installs it)")
def test_core_compiles_with_clang_and_werror():
    sources = sorted((ROOT / "csrc").rglob("*.cpp"))
    flags = ["-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
             f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{GGML_INCLUDE}"]

    def compile_one(source: Path) -> str:
        proc = subprocess.run(["clang++", *flags, str(source)], capture_output=True, text=True)
        return "" if proc.returncode == 0 else f"{source.relative_to(ROOT)}:\n{proc.stderr[:2000]}"

    assert len(sources) > 30
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        errors = [e for e in pool.map(compile_one, sources) if e]
    assert not errors, "\n".join(errors)
