"""Seeded mutation fuzzing of the GGUF loader.

    python tests/fuzz/gguf_fuzz.py --cases 100000 [--seed 0] [--corpus DIR ...]

Mutates model files (flipped bytes, truncations, huge counts and lengths, out-of-range offsets,
random header bytes, wrong types) and loads each in a worker process under a memory limit. Every
case must end in mllama.ModelLoadError, or load; a signal, a hang (per-case time bound), another
exception type or a memory blow-up is a failure, reported with the seed that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MUTATIONS = ("flip", "truncate", "huge_u64", "header_bytes", "type_field", "small_u64", "splice")


def header_end(data: bytes) -> int:
    """Where the tensor data starts (roughly): mutations favour the metadata and tensor infos."""
    return min(len(data), max(4096, len(data) // 50))


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(MUTATIONS)
    buf = bytearray(data)
    head = header_end(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(buf)) if rng.random() < 0.2 else rng.randrange(head)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        buf = buf[: rng.randrange(len(buf))]
    elif kind in ("huge_u64", "small_u64"):
        value = rng.choice([2**64 - 1, 2**63, 2**40, 2**32 + 1, 0xFFFFFFFF]) if kind == "huge_u64" else rng.randrange(0, 64)
        i = rng.randrange(max(1, head - 8))
        buf[i:i + 8] = struct.pack("<Q", value)
    elif kind == "header_bytes":
        i = rng.randrange(head)
        n = rng.randint(1, 64)
        buf[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
    elif kind == "type_field":
        i = rng.randrange(max(1, head - 4))
        buf[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 6, 8, 9, 12, 13, 31, 39, 40, 255, 2**31]))
    elif kind == "splice":
        a, b = sorted(rng.randrange(head) for _ in range(2))
        c = rng.randrange(head)
        buf[c:c] = buf[a:b]
    return bytes(buf), kind


WORKER = r"""
import json, os, resource, sys
if "asan" not in os.environ.get("LD_PRELOAD", ""):  # AddressSanitizer reserves terabytes of address space
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from mllama._native.ffi import ffi, lib
params = ffi.new("mllama_model_params *", lib.mllama_model_default_params())
ctx_params = ffi.new("mllama_context_params *", lib.mllama_context_default_params())
ctx_params.n_ctx, ctx_params.n_image_slots = 64, 1
model, ctx, hp = ffi.new("mllama_model **"), ffi.new("mllama_context **"), ffi.new("mllama_hparams *")
for line in sys.stdin:
    # the C ABI directly (what mllama.Model calls): any failure status is a ModelLoadError
    status = lib.mllama_model_load(line.strip().encode(), ffi.NULL, params, model)
    out = "error" if status != lib.MLLAMA_OK else "ok"
    if status == lib.MLLAMA_OK:
        if lib.mllama_model_get_hparams(model[0], hp) != lib.MLLAMA_OK:
            out = "bad:hparams"
        if lib.mllama_context_init(model[0], ctx_params, ctx) == lib.MLLAMA_OK:
            lib.mllama_context_free(ctx[0])
        lib.mllama_model_free(model[0])
    elif not ffi.string(lib.mllama_last_error()):
        out = "bad:no error message"
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"""


class Worker:
    def __init__(self, mem_limit: int):
        self.mem_limit = mem_limit
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(self.mem_limit)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def run(self, path: str, timeout: float) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return "hang"
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return f"crash:{code}"
        return line.strip()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def fuzz(corpus: list[Path], cases: int, seed: int, timeout: float = 20.0, mem_limit: int = 4 << 30,
         progress: bool = False) -> dict:
    bases = [p.read_bytes() for p in corpus]
    worker = Worker(mem_limit)
    counts = {"ok": 0, "error": 0}
    failures = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        path = os.path.join(tmp, "case.gguf")
        for i in range(cases):
            rng = random.Random(seed * 1_000_003 + i)
            base = rng.randrange(len(bases))
            data, kind = mutate(bases[base], rng)
            with open(path, "wb") as f:
                f.write(data)
            result = worker.run(path, timeout)
            if result in counts:
                counts[result] += 1
            else:
                failures.append({"case": i, "seed": seed, "corpus": str(corpus[base]), "mutation": kind, "result": result})
            if progress and (i + 1) % 1000 == 0:
                print(f"{i + 1} cases, {len(failures)} failures, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    worker.close()
    return {"cases": cases, **counts, "failures": failures, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    print(json.dumps(fuzz(args.corpus, args.cases, args.seed, progress=True), indent=2))


if __name__ == "__main__":
    main()
