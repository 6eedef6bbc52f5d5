"""What the CPU can do against what the loaded ggml was built to use, for `mllama info` and the
benchmarks: a ggml built for a lesser CPU (the prebuilt wheel) runs the same model several times
slower, so the gap is worth a warning."""

from __future__ import annotations

import platform
from pathlib import Path

from .system import system_info

# /proc/cpuinfo flag -> the name ggml's CPU backend reports for the same instructions
_FLAG_TO_GGML = {
    "avx": "AVX", "avx2": "AVX2", "f16c": "F16C", "fma": "FMA", "bmi2": "BMI2", "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
    "avx_vnni": "AVX_VNNI", "amx_int8": "AMX_INT8",
}


def cpu_flags() -> set[str]:
    """Instruction-set flags of this CPU as Linux names them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def ggml_features(info: str | None = None) -> dict[str, str]:
    """name -> value of every feature the loaded backends report (CPU: SSE3=1 AVX2=1 ...)."""
    out = {}
    for part in (info if info is not None else system_info()).split("|"):
        for item in part.split(":", 1)[-1].split():
            if "=" in item:
                name, value = item.split("=", 1)
                out[name] = value
    return out


def cpu_report(flags: set[str] | None = None, info: str | None = None) -> dict:
    """The CPU's features, the ones ggml uses, the ones it leaves unused, and the GEMM path."""
    flags = cpu_flags() if flags is None else flags
    features = ggml_features(info)
    supported = sorted(g for f, g in _FLAG_TO_GGML.items() if f in flags)
    used = sorted(name for name, value in features.items() if value == "1")
    unused = [g for g in supported if features.get(g) != "1"]
    llamafile = features.get("LLAMAFILE") == "1"
    gemm = ("llamafile tinyBLAS (BF16/F16/F32 GEMMs)" if llamafile else "ggml generic (no llamafile GEMMs)")
    return {"machine": platform.machine(), "cpu_supports": supported, "ggml_uses": used, "unused_by_ggml": unused,
            "gemm_path": gemm, "llamafile": llamafile,
            "mllama_kernels": features.get("AVX512_BF16_KERNELS") == "1",
            "mllama_avx2_kernels": features.get("AVX2_KERNELS") == "1",
            "cpu_amx_bf16": "amx_bf16" in flags, "mllama_amx_tiles": features.get("AMX_TILE_KERNELS") == "1",
            "mllama_kernels_built": features.get("X86_KERNELS") == "1"}


def warning(report: dict) -> str | None:
    """One line for stderr when the loaded ggml leaves CPU features or llamafile GEMMs unused."""
    gaps = list(report["unused_by_ggml"])
    if report["cpu_supports"] and not report["llamafile"]:
        gaps.append("LLAMAFILE")
    if not gaps:
        return None
    try:
        from importlib.metadata import version

        pinned = version("libggml-python")
    except Exception:  # not installed from PyPI (a source tree): the README says what to do
        pinned = "<pinned version>"
    return ("warning: the loaded ggml does not use " + ", ".join(gaps) + " that this CPU supports; rebuild it "
            "for several times faster prompts and images: CMAKE_ARGS=\"-DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON\" pip install "
            "--no-cache-dir --no-binary libggml-python --force-reinstall libggml-python==" + pinned + " (README)")
