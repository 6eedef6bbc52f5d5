"""Many clients at once against `mllama serve --parallel 4`: six concurrent clients (one goes away
mid-stream, one sends an image, one asks for n=2) each get what the same request gives alone
(temperature 0); /metrics and /health say what happened; memory is back to its baseline after."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from test_server import data_url, post, start_server
from test_server_load import ASAN_RSS_REASON, UNDER_ASAN
from test_server_load import process_rss as rss


def ask(base: str, body: dict) -> list[str]:
    status, reply = post(base, "/v1/chat/completions", json.dumps(body).encode(), timeout=180)
    assert status == 200, reply
    return [c["message"]["content"] for c in json.loads(reply)["choices"]]


def leave_mid_stream(base: str, started: threading.Event) -> None:
    body = {"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=180) as r:
        for _ in range(4):
            r.readline()
        started.set()  # the connection closes here: the client is gone


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


REQUESTS = [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}},
                                               {"type": "text", "text": "Describe this image."}]}], "max_tokens": 12},
    {"messages": [{"role": "user", "content": "Name two rivers."}], "max_tokens": 10, "n": 2},
    {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 9},
    {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 14},
    {"messages": [{"role": "user", "content": "What is a lighthouse?"}], "max_tokens": 11},
]


@pytest.fixture(scope="module")
def server(gguf_f32):
    base, proc = start_server(gguf_f32, "--parallel", "4", "--max-queue", "8", "--ctx", "1024")
    yield base, proc
    proc.terminate()
    proc.wait(timeout=30)


def run_together(base: str) -> list:
    results: list = [None] * len(REQUESTS)
    started = threading.Event()

    def one(i: int) -> None:
        results[i] = ask(base, {**REQUESTS[i], "temperature": 0})

    threads = [threading.Thread(target=leave_mid_stream, args=(base, started))]
    threads += [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert started.is_set() and not any(t.is_alive() for t in threads)
    return results


def test_six_clients_get_what_each_gets_alone(server):
    base, proc = server
    alone = [ask(base, {**body, "temperature": 0}) for body in REQUESTS]
    assert len(alone[1]) == 2 and alone[1][0] == alone[1][1]  # greedy choices of one prompt agree
    run_together(base)  # warm-up: the scheduler's buffers grow to the largest batch
    baseline = rss(proc.pid)
    requests_before = metric(base, "mllama_requests_total")
    together = run_together(base)
    assert together == alone
    assert metric(base, "mllama_requests_total") - requests_before == len(REQUESTS) + 1
    assert metric(base, "mllama_requests_cancelled_total") >= 2  # the two clients that left
    assert metric(base, "mllama_requests_running") == 0 and metric(base, "mllama_requests_waiting") == 0
    assert metric(base, "mllama_requests_encoding") == 0
    assert metric(base, "mllama_batch_rows_count") > 0 and metric(base, "mllama_generated_tokens_total") > 0
    assert metric(base, "mllama_images_encoded") == 1  # the same image in three rounds: encoded once
    assert metric(base, "mllama_image_slot_hits_total") == 2
    health = json.loads(urllib.request.urlopen(base + "/health").read())
    assert health["sequences"] == 4 and health["running"] == 0 and health["waiting"] == 0
    if UNDER_ASAN:
        pytest.skip(ASAN_RSS_REASON)
    assert rss(proc.pid) - baseline < 32 * 2**20
