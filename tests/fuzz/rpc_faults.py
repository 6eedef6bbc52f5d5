"""A ggml RPC worker lost at every point of a model's life: load, text graphs, a larger graph (its buffers freed
and allocated again), an image, close.

    python tests/fuzz/rpc_faults.py MODEL.gguf [--every 1] [--first 0] [--last N]

A loopback proxy (CuttingProxy) passes ggml's requests to a real worker (`mllama rpc-server`) and the answers
back, and closes both ends when it sees request number k: the worker is gone from that point on. For each k the
model runs in a child process, which must end with status 0 having said what failed (an MllamaError from the load,
or from the steps after the cut; close() then succeeds). A signal (a crash or ggml's abort), a hang past the time
bound, or another exception is a failure, reported with its k. tests/test_rpc.py runs a sample of the points and a
targeted cut (between freeing and allocating a graph's buffers).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

# ggml-rpc's commands (ggml-rpc.cpp's rpc_cmd; the first ones are the same in every protocol version)
RPC_ALLOC_BUFFER, RPC_FREE_BUFFER, RPC_GRAPH_COMPUTE, RPC_GRAPH_RECOMPUTE = 0, 4, 10, 16

# The child: every step that reaches the worker, each failure said on stdout (the model refuses to run after one).
LIFE = """
import sys
import numpy as np
import mllama
from mllama._native.errors import MllamaError
try:
    model = mllama.Model(sys.argv[1], n_ctx=256, rpc=[sys.argv[2]], rpc_timeout=5, rpc_io_timeout=5)
except MllamaError as exc:
    print("load error:", exc, flush=True)
    sys.exit(0)
steps = [lambda: model.forward([128000, 9906]),  # graphs of two rows: the compute buffers sized for them
         lambda: model.forward([128000] + [9906] * 120),  # a bigger graph: its buffers freed, then allocated again
         lambda: model.describe(np.zeros((60, 60, 3), np.uint8), max_tokens=3, temperature=0.0),
         lambda: model.forward([128000, 9906, 1917])]
for i, step in enumerate(steps):
    try:
        step()
    except MllamaError as exc:
        print(f"step {i} error:", exc, flush=True)
model.close()
print("closed", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mllama", "rpc-server", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited: {proc.stderr.read().decode()}")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("rpc-server did not start listening")


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


def _close(end: socket.socket) -> None:
    with contextlib.suppress(OSError):  # shut down first: a recv blocked on it in another thread kept it open
        end.shutdown(socket.SHUT_RDWR)
    end.close()


class CuttingProxy:
    """A loopback proxy to the worker on worker_port: it passes ggml's requests (a command byte, a 64-bit size, the
    body) and the answers through until cut(index, command, earlier commands) says otherwise for a request (index:
    its number among all the client's requests, on every connection), then closes both ends of that connection, as a
    worker lost there would, and sets `cut_done`. `endpoint` is its address; close() stops it."""

    def __init__(self, worker_port: int, cut: Callable[[int, int, list[int]], bool]):
        self.worker_port, self.cut = worker_port, cut
        self.commands: list[int] = []
        self.cut_done = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        try:
            while True:
                client = self._listener.accept()[0]
                worker = socket.create_connection(("127.0.0.1", self.worker_port))
                threading.Thread(target=self._answers, args=(worker, client), daemon=True).start()
                threading.Thread(target=self._requests, args=(client, worker), daemon=True).start()
        except OSError:  # the listener closed
            return

    @staticmethod
    def _answers(worker: socket.socket, client: socket.socket) -> None:
        try:
            while data := worker.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)

    def _requests(self, client: socket.socket, worker: socket.socket) -> None:
        try:
            while header := client.recv(9, socket.MSG_WAITALL):
                command, size = header[0], struct.unpack("<Q", header[1:9])[0]
                with self._lock:
                    index, earlier = len(self.commands), list(self.commands)
                    self.commands.append(command)
                if self.cut(index, command, earlier):
                    self.cut_done.set()
                    break
                worker.sendall(header)
                while size and (data := client.recv(min(size, 1 << 20))):
                    worker.sendall(data)
                    size -= len(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(worker)


def run_life(gguf: str, cut: Callable[[int, int, list[int]], bool], timeout: float = 300) -> tuple[object, str, str, list]:
    """LIFE in a child process through a CuttingProxy to a fresh worker: (return code or "timeout", stdout, stderr,
    the requests' commands)."""
    port = free_port()
    worker = start_worker(port)
    proxy = CuttingProxy(port, cut)
    try:
        child = subprocess.run([sys.executable, "-c", LIFE, gguf, proxy.endpoint], capture_output=True, text=True,
                               timeout=timeout)
        outcome = (child.returncode, child.stdout, child.stderr)
    except subprocess.TimeoutExpired:
        outcome = ("timeout", "", "")
    finally:
        proxy.close()
        stop(worker)
    return (*outcome, proxy.commands)


def clean(returncode, stdout: str) -> bool:
    """A life that ended as it must: status 0, and either a load error or a close after its steps."""
    return returncode == 0 and (stdout.startswith("load error:") or stdout.endswith("closed\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a GGUF file (the tests' tiny F32 fixture: seconds per point)")
    parser.add_argument("--every", type=int, default=1, help="cut at every n-th request")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=None, help="default: the number of requests of a whole life")
    args = parser.parse_args()
    code, out, _, commands = run_life(args.model, lambda *_: False)
    assert clean(code, out), (code, out)
    last = len(commands) if args.last is None else args.last
    print(f"a whole life: {len(commands)} requests", flush=True)
    failures = []
    for k in range(args.first, last, args.every):
        code, out, err, seen = run_life(args.model, lambda index, *_: index == k)
        ok = clean(code, out)
        command = seen[k] if k < len(seen) else None
        print(k, "command", command, "status", code, "ok" if ok else f"FAILED: {err[-300:]}", flush=True)
        if not ok:
            failures.append(k)
    print("failures:", failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
