"""Where a model's components go: ggml RPC workers, the device list the text layers are split over,
the split itself, and the report of where everything went (C: model/devices.cpp, model/report.cpp)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .ffi import call, cstr, ffi, lib


@dataclass(frozen=True)
class Placement:
    """One component of a loaded model and the device that holds it."""
    component: str       # "vision" (tower + projector), "token_embd", "text" (a run of layers), "output"
    first_layer: int     # text runs: the first layer; else -1
    n_layers: int        # text runs: the layers in the run; else 0
    device: str          # ggml's device name: "CPU", "CUDA0", "RPC0"
    endpoint: str        # an RPC device's worker, host:port; else ""
    n_bytes: int         # weight bytes placed there
    reason: str          # why it went there

    def describe(self) -> str:
        last = self.first_layer + self.n_layers - 1
        layers = f"text layer {last}" if self.n_layers == 1 else f"text layers {self.first_layer}-{last}"
        what = (layers if self.component == "text"
                else {"vision": "vision tower + projector", "token_embd": "token embedding"}.get(self.component,
                                                                                               self.component))
        where = self.device + (f" ({self.endpoint})" if self.endpoint else "")
        size = f"{self.n_bytes / 2**30:.1f} GiB" if self.n_bytes >= 2**30 else f"{self.n_bytes / 2**20:.1f} MiB"
        return f"{what}: {where}, {size} ({self.reason})"


def rpc_supported() -> bool:
    """The loaded ggml has its RPC backend (built with -DGGML_RPC=ON)."""
    return bool(lib.mllama_rpc_supported())


def names_list(value: str | Sequence[str] | None, what: str) -> str | None:
    """"a,b" or ["a", "b"] -> "a,b"; None or empty -> None."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise TypeError(f"{what} must be a string or a list of strings")
    return ",".join(p.strip() for item in items for p in item.split(",") if p.strip()) or None


def rpc_list(value: str | Sequence[str] | None, source: str = "rpc") -> str | None:
    """The RPC workers as "host:port,host:port", each checked (ValueError naming `source`: "rpc" or the
    environment variable the list came from)."""
    joined = names_list(value, source)
    for endpoint in (joined or "").split(","):
        host, colon, port = endpoint.rpartition(":")
        if endpoint and not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{source}: {endpoint!r} is not host:port (e.g. 192.168.1.20:50052)")
    return joined


def split_values(tensor_split: Sequence[float] | str | None) -> list[float] | None:
    """[3, 1] or "3,1" -> weights >= 0, not all zero; None -> None (free memory decides)."""
    if tensor_split is None:
        return None
    items = tensor_split.split(",") if isinstance(tensor_split, str) else list(tensor_split)
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"tensor_split must be numbers (got {tensor_split!r})") from None
    single = [float(v) if abs(v) <= _FLOAT32_MAX else math.inf for v in values]  # (the C side's floats)
    single = [v if abs(v) >= _FLOAT32_TINY else 0.0 for v in single]
    if not values or any(not math.isfinite(v) or v < 0 for v in single) or sum(single) <= 0:
        raise ValueError(f"tensor_split must be weights >= 0, not all zero, within float32's range "
                         f"(got {tensor_split!r})")
    return values


_FLOAT32_MAX, _FLOAT32_TINY = 3.4028234663852886e38, 1.401298464324817e-45  # (the largest, the smallest above 0)


_MAX_TIMEOUT_S = (2**31 - 1) // 1000


def fill_params(params, strings, *, rpc, devices, tensor_split, rpc_timeout, rpc_io_timeout=None,
                rpc_source="rpc") -> list:
    """Sets the placement fields of mllama_model_params; returns the buffers to keep alive over the call."""
    params.rpc_servers = strings(rpc_list(rpc, rpc_source))
    params.devices = strings(names_list(devices, "devices"))
    values = split_values(tensor_split)
    keep = []
    if values:
        keep.append(ffi.new("float[]", values))
        params.tensor_split, params.n_tensor_split = keep[-1], len(values)
    if rpc_timeout is not None:  # (the C side's int32 milliseconds: at most about 24 days)
        if not 0 < rpc_timeout <= _MAX_TIMEOUT_S:
            raise ValueError(f"rpc_timeout must be > 0 and <= {_MAX_TIMEOUT_S} seconds (got {rpc_timeout!r})")
        params.rpc_timeout_ms = max(1, round(float(rpc_timeout) * 1000))
    if rpc_io_timeout is not None:
        if not 1 <= rpc_io_timeout <= _MAX_TIMEOUT_S:
            raise ValueError(f"rpc_io_timeout must be >= 1 and <= {_MAX_TIMEOUT_S} seconds (got {rpc_io_timeout!r})")
        params.rpc_io_timeout_s = int(rpc_io_timeout)
    return keep


def read_placement(model_ptr) -> list[Placement]:
    n = lib.mllama_model_get_placement(model_ptr, ffi.NULL, 0)
    if n < 0:
        return []
    buf = ffi.new("mllama_placement[]", n)
    lib.mllama_model_get_placement(model_ptr, buf, n)
    return [Placement(cstr(e.component), int(e.first_layer), int(e.n_layers), cstr(e.device), cstr(e.endpoint),
                      int(e.n_bytes), cstr(e.reason)) for e in buf]


def split_layers(n_layer: int, n_offload: int, proportions: Sequence[float]) -> list[int]:
    """The loader's split arithmetic: device index per text layer (-1: the CPU)."""
    props = ffi.new("float[]", [float(p) for p in proportions] or [0.0])
    out = ffi.new("int32_t[]", max(1, n_layer))
    call(lib.mllama_split_layers, n_layer, n_offload, props, len(proportions), out)
    return [int(out[i]) for i in range(n_layer)]


def serve(endpoint: str, devices: str | None, n_threads: int, cache_dir: str | None) -> None:
    """Runs ggml's RPC server (blocks for the life of the process; raises on a bad name or a taken port)."""
    keep = [ffi.new("char[]", s.encode()) if s else ffi.NULL for s in (endpoint, devices, cache_dir)]
    call(lib.mllama_rpc_serve, keep[0], keep[1], int(n_threads), keep[2])
