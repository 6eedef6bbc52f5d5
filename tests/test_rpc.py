"""A model split over ggml RPC workers (`mllama rpc-server` processes on loopback) and the local CPU:
the same logits and tokens as the local run, the placement report, and the faults (a worker killed
mid-generation, never started, the wrong port) as exceptions naming the endpoint.

Needs a ggml built with -DGGML_RPC=ON (.ci/run builds one); elsewhere these tests skip, or fail
under MLLAMA_REQUIRE_RPC=1 (CI)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama._native.errors import MllamaError
from mllama._native.placement import rpc_supported

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from rpc_faults import (RPC_ALLOC_BUFFER, RPC_FREE_BUFFER, RPC_GRAPH_COMPUTE, RPC_GRAPH_RECOMPUTE,  # noqa: E402
                        clean, free_port, run_life, start_worker, stop)

if not rpc_supported():
    if os.environ.get("MLLAMA_REQUIRE_RPC") == "1":
        raise RuntimeError("MLLAMA_REQUIRE_RPC=1 but the loaded ggml has no RPC backend")
    pytest.skip("the loaded ggml has no RPC backend (build it with CMAKE_ARGS=-DGGML_RPC=ON)", allow_module_level=True)

FAULT_DEADLINE_S = 60  # the bound for a fault to become an exception


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


@pytest.fixture(scope="module")
def workers():
    ports = [free_port(), free_port()]
    procs = [start_worker(p) for p in ports]
    yield [f"127.0.0.1:{p}" for p in ports]
    for proc in procs:
        stop(proc)


def image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (100, 100, 3), dtype=np.uint8))


MESSAGES = {
    "text": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
    "image": [{"role": "user", "content": [{"type": "image", "image": image()},
                                           {"type": "text", "text": "Describe this image."}]}],
}


@pytest.fixture(scope="module")
def local(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=256) as m:
        yield {name: (m.forward(*m.chat_prompt(msgs)),
                      list(m.generate_tokens(*m.chat_prompt(msgs), temperature=0.0, max_tokens=16)))
               for name, msgs in MESSAGES.items()}


def text_runs(model) -> list[tuple[int, int, str]]:
    return [(p.first_layer, p.n_layers, p.endpoint or p.device) for p in model.placement if p.component == "text"]


@pytest.mark.parametrize("name", MESSAGES)
def test_split_over_two_workers_and_the_cpu_matches_local(gguf_f32, workers, local, name):
    # 4 text layers, shares 1:2:1 -> layer 0 on the first worker, 1-2 on the second, 3 (and the output) here
    with mllama.Model(gguf_f32, n_ctx=256, rpc=workers, devices=[*workers, "CPU"], tensor_split=[1, 2, 1]) as m:
        assert text_runs(m) == [(0, 1, workers[0]), (1, 2, workers[1]), (3, 1, "CPU")]
        assert m.placement[2].describe().startswith("text layer 0: RPC")
        assert m.placement[3].describe().startswith("text layers 1-2: RPC") and workers[1] in m.placement[3].describe()
        by_component = {p.component: p for p in m.placement}
        assert by_component["vision"].device == "CPU"  # the tower stays local
        assert by_component["output"].device == "CPU" and "tensor_split 1, 2, 1" in m.placement[2].reason
        tokens, images = m.chat_prompt(MESSAGES[name])
        logits = m.forward(tokens, images)
        greedy = list(m.generate_tokens(tokens, images, temperature=0.0, max_tokens=16))
    ref_logits, ref_greedy = local[name]
    assert nmse(logits, ref_logits) <= 1e-6
    assert greedy == ref_greedy


def test_default_split_puts_layers_on_the_workers_only(gguf_f32, workers, local):
    with mllama.Model(gguf_f32, n_ctx=256, rpc=workers, tensor_split=[3, 1]) as m:
        assert text_runs(m) == [(0, 3, workers[0]), (3, 1, workers[1])]
        assert m.placement[-1].endpoint == workers[1]  # the output goes with the last layer
        assert m.info["n_gpu_layers"] == 4
        assert "text layers" in m.op_paths()
        tokens, images = m.chat_prompt(MESSAGES["image"])
        assert nmse(m.forward(tokens, images), local["image"][0]) <= 1e-6


def test_vision_tower_on_a_worker(gguf_f32, workers, local):
    with mllama.Model(gguf_f32, n_ctx=256, rpc=workers[:1], device=workers[0], devices=["CPU"]) as m:
        vision = m.placement[0]
        assert (vision.component, vision.endpoint) == ("vision", workers[0])
        assert text_runs(m) == [(0, 4, "CPU")]
        tokens, images = m.chat_prompt(MESSAGES["image"])
        assert nmse(m.forward(tokens, images), local["image"][0]) <= 1e-6


def test_device_names_a_worker_without_a_device_list(gguf_f32, workers, local):
    """device= a worker (its endpoint or its device name): the tower there, the text layers over every worker."""
    with mllama.Model(gguf_f32, n_ctx=256, rpc=workers, device=workers[1], tensor_split=[1, 1]) as m:
        assert (m.placement[0].component, m.placement[0].endpoint) == ("vision", workers[1])
        assert text_runs(m) == [(0, 2, workers[1]), (2, 2, workers[0])]
        tokens, images = m.chat_prompt(MESSAGES["image"])
        assert nmse(m.forward(tokens, images), local["image"][0]) <= 1e-6


def test_one_worker_named_twice_is_refused(gguf_f32, workers):
    """Two spellings of one worker would wait on each other (a worker serves one client at a time)."""
    port = workers[0].rsplit(":", 1)[1]
    start = time.monotonic()
    with pytest.raises(MllamaError, match=f"are the same worker \\(127.0.0.1:{port}\\)"):
        mllama.Model(gguf_f32, n_ctx=256, rpc=[workers[0], f"localhost:{port}"])
    assert time.monotonic() - start < FAULT_DEADLINE_S
    with mllama.Model(gguf_f32, n_ctx=256, rpc=workers[:1]) as m:  # the worker still serves
        assert text_runs(m) == [(0, 4, workers[0])]


def test_n_gpu_layers_keeps_the_first_layers_local(gguf_f32, workers):
    with mllama.Model(gguf_f32, n_ctx=256, rpc=workers[:1], n_gpu_layers=1) as m:
        assert text_runs(m) == [(0, 3, "CPU"), (3, 1, workers[0])]
        assert "n_gpu_layers 1" in m.placement[2].reason


@pytest.mark.parametrize("kwargs,message", [
    (dict(tensor_split=[1, 1, 1]), "tensor_split has 3 values for 2 devices"),
    (dict(tensor_split=[0, 0]), "tensor_split must be weights"),
    (dict(devices=["RPC-nonexistent"]), r"unknown device 'RPC-nonexistent' \(available: CPU.*, RPC.* \(127\.0\.0\.1:"),
])
def test_bad_placement_arguments_are_clear_errors(gguf_f32, workers, kwargs, message):
    with pytest.raises((MllamaError, ValueError), match=message):
        mllama.Model(gguf_f32, n_ctx=256, rpc=workers, **kwargs)


@pytest.mark.parametrize("endpoint,error,message", [
    ("never-started", MllamaError, "no answer"), ("wrong-port", MllamaError, "no answer"),
    ("not-host-port", ValueError, "is not host:port"), ("ipv6", MllamaError, "IPv4 only"),
    ("no-such-host", MllamaError, "not found"), ("bracketed", MllamaError, "without brackets")])
def test_unreachable_worker_at_load(gguf_f32, endpoint, error, message):
    target = {"never-started": f"127.0.0.1:{free_port()}", "wrong-port": "127.0.0.1:9",
              "not-host-port": "localhost", "ipv6": f"[::1]:{free_port()}",
              "no-such-host": "no-such-host.invalid:50052", "bracketed": f"[127.0.0.1]:{free_port()}"}[endpoint]
    start = time.monotonic()
    with pytest.raises(error, match=message) as err:
        mllama.Model(gguf_f32, n_ctx=256, rpc=[target])
    assert time.monotonic() - start < FAULT_DEADLINE_S
    assert target in str(err.value)
    with mllama.Model(gguf_f32, n_ctx=256) as m:  # the next model in this process works
        assert m.forward([128000, 9906])[-1].shape == (128256,)


@pytest.mark.parametrize("peer", ["silent", "http"])
def test_a_listener_that_is_not_a_worker(gguf_f32, peer):
    """A service that accepts the connection and never answers, or answers in another protocol."""
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer_http():  # every connection (mllama's reachability check, then ggml's)
            try:
                while True:
                    conn, _ = listener.accept()
                    with conn:
                        if conn.recv(64):
                            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            except OSError:  # the listener closed at the end of the test
                return

        if peer == "http":
            threading.Thread(target=answer_http, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(MllamaError, match=endpoint):
            mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint], rpc_timeout=2)
        elapsed = time.monotonic() - start
        assert elapsed < (2 + 5 + 1 if peer == "silent" else 1.5)  # silent: the timeout, then <= 5 s to unblock


def test_a_worker_silent_after_its_handshake(gguf_f32):
    """A peer that completes ggml's handshake (HELLO, DEVICE_COUNT: protocol 5.x) and answers nothing more: ggml's
    next request comes on a new connection, which no I/O timeout bounded yet (the load blocked forever)."""
    import struct
    import threading

    def exactly(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def handshake_then_silence(conn):
        with conn:
            try:
                exactly(conn, struct.unpack("<Q", exactly(conn, 9)[1:])[0])  # HELLO's body
                conn.sendall(struct.pack("<Q", 28) + bytes([5, 0, 0, 0]) + bytes(24))  # version 5.0.0
                if struct.unpack("<Q", exactly(conn, 9)[1:])[0] == 0:  # DEVICE_COUNT: one
                    conn.sendall(struct.pack("<Q", 4) + struct.pack("<I", 1))
                while conn.recv(65536):
                    pass
            except OSError:
                return

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

        def serve():
            try:
                while True:
                    threading.Thread(target=handshake_then_silence, args=(listener.accept()[0],), daemon=True).start()
            except OSError:  # the listener closed at the end of the test
                return
        threading.Thread(target=serve, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(MllamaError, match=f"{endpoint} answered ggml's handshake but not its first request"):
            mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint], rpc_timeout=2, rpc_io_timeout=3)
        assert time.monotonic() - start < 2 + 5 + 2  # the timeout, then <= 5 s to unblock


def test_a_busy_worker_says_it_may_be_serving_another_client(gguf_f32, workers):
    with mllama.Model(gguf_f32, n_ctx=256, rpc=[workers[1]], devices=[workers[1]]):  # (its connection held)
        code = f"import mllama; mllama.Model({str(gguf_f32)!r}, n_ctx=256, rpc=[{workers[1]!r}], rpc_timeout=2)"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "serving another client" in other.stderr  # (had said "not a ggml RPC server?")


def test_two_models_on_one_worker_from_two_threads(gguf_f32, workers, local):
    """ggml keeps one connection per worker for the process: two models' calls on it must not interleave
    (they had corrupted the protocol within seconds, and the worker was then refused as lost)."""
    from concurrent.futures import ThreadPoolExecutor

    models = [mllama.Model(gguf_f32, n_ctx=256, rpc=[workers[0]], devices=[workers[0]]) for _ in range(2)]
    try:
        def greedy(model):
            return [list(model.generate_tokens(*model.chat_prompt(MESSAGES["text"]), temperature=0.0, max_tokens=16))
                    for _ in range(3)]
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(greedy, models))
    finally:
        for model in models:
            model.close()
    assert runs == [[local["text"][1]] * 3] * 2


def test_worker_killed_mid_generation(gguf_f32, local):
    port = free_port()
    proc = start_worker(port)
    endpoint = f"127.0.0.1:{port}"
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    try:
        m = mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint], devices=[endpoint, "CPU"], tensor_split=[1, 1])
        tokens, images = m.chat_prompt(MESSAGES["text"])
        stream = m.generate_tokens(tokens, images, temperature=0.0, max_tokens=64)
        first = [next(stream) for _ in range(4)]
        assert first == local["text"][1][:4]
        stop(proc)
        start = time.monotonic()
        with pytest.raises(MllamaError, match=endpoint):
            for _ in stream:
                pass
        assert time.monotonic() - start < FAULT_DEADLINE_S
        with pytest.raises(MllamaError, match="failed earlier|close"):  # the model refuses to run on
            m.forward(tokens)
        assert m.info["lost_worker"] == 1  # what `mllama serve`'s /health reports (503)
        m.close()
    finally:
        stop(proc) if proc.poll() is None else None
    if fds_before is not None:  # at most the dead worker's socket stays open (README: Faults)
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 1
    with mllama.Model(gguf_f32, n_ctx=256) as again:
        assert nmse(again.forward(*again.chat_prompt(MESSAGES["text"])), local["text"][0]) <= 1e-12
    restarted = start_worker(port)  # ggml keeps the dead connection of that endpoint: refused at once, said why
    try:
        start = time.monotonic()
        with pytest.raises(MllamaError, match=f"{endpoint} was lost earlier in this process"):
            mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint])
        assert time.monotonic() - start < 5
        with mllama.Model(gguf_f32, n_ctx=256, rpc=[f"localhost:{port}"]) as other_name:  # README's workaround
            assert nmse(other_name.forward(*other_name.chat_prompt(MESSAGES["text"])), local["text"][0]) <= 1e-6
    finally:
        stop(restarted)


def test_a_worker_lost_while_the_model_was_idle(gguf_f32):
    """Its close() frees what it can; a later load of that endpoint is refused as lost, saying why (ggml keeps the
    broken connection: the load had failed on it with ggml's "malformed response", blaming a healthy worker)."""
    port = free_port()
    proc = start_worker(port)
    endpoint = f"127.0.0.1:{port}"
    try:
        model = mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint])
        stop(proc)
        model.close()
        proc = start_worker(port)
        with pytest.raises(MllamaError, match=f"{endpoint} was lost earlier in this process"):
            mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint])
    finally:
        stop(proc)


def between_free_and_alloc(index: int, command: int, earlier: list[int]) -> bool:
    """A buffer allocated after a graph ran and a buffer was freed since (a graph larger than any before it)."""
    graphs = [i for i, c in enumerate(earlier) if c in (RPC_GRAPH_COMPUTE, RPC_GRAPH_RECOMPUTE)]
    return command == RPC_ALLOC_BUFFER and bool(graphs) and RPC_FREE_BUFFER in earlier[graphs[0]:]


def test_a_worker_lost_between_freeing_and_allocating_a_graphs_buffers(gguf_f32):
    """The worker is lost after a graph larger than any before it freed its compute buffers and before they are
    allocated again (tests/fuzz/rpc_faults.py's proxy cuts the connection there): an error naming the worker, and
    close() does not crash (ggml's allocator kept the buffer it had freed, and freeing the scheduler at close was a
    double free). The model runs in a child process, so that a crash is a result."""
    code, out, err, _ = run_life(str(gguf_f32), between_free_and_alloc)
    assert clean(code, out), (code, out, err[-2000:])
    assert "step 1 error: RPC worker 127.0.0.1:" in out and "the model cannot run any more" in out, out


def test_a_worker_lost_at_any_request_is_an_error_never_a_crash(gguf_f32):
    """A sample of tests/fuzz/rpc_faults.py's sweep: the worker lost at every 37th of a model's requests (the
    load's, text graphs', a larger graph's, an image's): each life ends with an MllamaError said and a clean close,
    or a load error. (The whole sweep, 261 points, was clean on 2026-12-08.)"""
    code, out, _, commands = run_life(str(gguf_f32), lambda *_: False)
    assert clean(code, out) and out == "closed\n", (code, out)
    for k in range(5, len(commands), 37):
        code, out, err, seen = run_life(str(gguf_f32), lambda index, *_: index == k)
        assert clean(code, out) and "error:" in out, (k, seen[k:k + 1], code, out, err[-2000:])


@pytest.mark.parametrize("reader", ["slot_state", "cross_kv"])
def test_a_worker_lost_while_a_cache_is_read_back(gguf_f32, reader):
    """An image slot's K/V read back outside a graph (the image cache's blob, the debugging read) with its worker
    gone: the error names the worker and the model is marked lost (it had been ggml's own message, and the model
    was still called healthy)."""
    from mllama._native.slot_state import get_slot_state

    port = free_port()
    proc = start_worker(port)
    endpoint = f"127.0.0.1:{port}"
    try:
        with mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint]) as m:  # every text layer (and its cross K/V) there
            pre = mllama.preprocess(image(), m)
            m.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)
            stop(proc)
            with pytest.raises(MllamaError, match=f"RPC worker {endpoint} .*the model cannot run any more"):
                get_slot_state(m._ctx, 0) if reader == "slot_state" else m.cross_kv(0, 0)
            assert m.info["lost_worker"] == 1
    finally:
        stop(proc) if proc.poll() is None else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the I/O timeout finds ggml's sockets in /proc")
def test_worker_that_stops_answering(gguf_f32):
    """A frozen worker (SIGSTOP: connected, silent) fails the call after rpc_io_timeout instead of hanging."""
    import signal

    port = free_port()
    proc = start_worker(port)
    endpoint = f"127.0.0.1:{port}"
    try:
        with mllama.Model(gguf_f32, n_ctx=256, rpc=[endpoint], rpc_io_timeout=3) as m:
            tokens, _ = m.chat_prompt(MESSAGES["text"])
            m.forward(tokens)
            proc.send_signal(signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(MllamaError, match=endpoint):
                m.forward(tokens[:-1] + [tokens[0]])
            assert 3 <= time.monotonic() - start < 3 + 10
            assert m.info["lost_worker"] == 1
    finally:
        proc.send_signal(signal.SIGCONT)
        stop(proc)


def test_split_arithmetic_matches_llama_cpp_rule():
    from mllama._native.placement import split_layers

    assert split_layers(4, -1, [1, 1]) == [0, 0, 1, 1]
    assert split_layers(5, -1, [1, 1]) == [0, 0, 0, 1, 1]
    assert split_layers(4, 2, [1]) == [-1, -1, 0, 0]
    assert split_layers(40, -1, [1, 0, 3]) == [0] * 10 + [2] * 30
    assert split_layers(3, 0, [1]) == [-1, -1, -1]
    with pytest.raises(ValueError, match="tensor_split"):
        split_layers(4, -1, [0, 0])


@pytest.mark.parametrize("host,warns", [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True)])
def test_rpc_server_warns_when_reachable_from_other_machines(host, warns):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mllama", "rpc-server", "--host", host, "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert ("no authentication" in err) == warns, err
