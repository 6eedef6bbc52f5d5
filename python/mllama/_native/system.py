"""What the library and the machine offer: versions, devices, ggml's features, and the library's
defaults (context sizes, the reference preprocessor's constants)."""

from __future__ import annotations

from functools import lru_cache

from .ffi import call, cstr, ffi, lib

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def abi_version() -> int:
    return int(lib.mllama_abi_version())


def native_version() -> str:
    return cstr(lib.mllama_version())


def system_info() -> str:
    buf = ffi.new("char[]", 4096)
    call(lib.mllama_system_info, buf, len(buf))
    return cstr(buf)


def devices() -> list[dict]:
    """The compute devices ggml offers (through its backend registry)."""
    out = []
    info = ffi.new("mllama_device_info *")
    for i in range(lib.mllama_device_count()):
        call(lib.mllama_device_get_info, i, info)
        out.append({
            "index": i,
            "name": cstr(info.name),
            "description": cstr(info.description),
            "type": DEVICE_TYPES.get(info.type, "unknown"),
            "memory_free": int(info.memory_free),
            "memory_total": int(info.memory_total),
        })
    return out


@lru_cache(maxsize=1)
def image_defaults() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the reference preprocessor (CLIP's), assumed where a file or config lacks them."""
    out = ffi.new("mllama_image_defaults *")
    lib.mllama_get_image_defaults(out)
    return tuple(float(x) for x in out.image_mean), tuple(float(x) for x in out.image_std)


@lru_cache(maxsize=None)
def default_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """The (tiles_h, tiles_w) pairs the reference supports for max_tiles, in the reference order."""
    n = lib.mllama_default_aspect_ratios(max_tiles, ffi.NULL, 0)
    if n < 0:
        raise ValueError(f"max_tiles must be at least 1 (got {max_tiles})")
    buf = ffi.new("int32_t[]", max(1, n))
    lib.mllama_default_aspect_ratios(max_tiles, buf, n)
    return tuple((int(buf[i]), int(buf[i + 1])) for i in range(0, n, 2))


def context_defaults() -> dict:
    """The C library's default context parameters (n_ctx 0 = resolved from the model at load)."""
    p = lib.mllama_context_default_params()
    return {"n_ctx": int(p.n_ctx), "n_batch": int(p.n_batch), "n_image_slots": int(p.n_image_slots)}
