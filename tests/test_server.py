"""The OpenAI-compatible server, started on a free loopback port, driven by the official client."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf, *flags: str) -> tuple[str, subprocess.Popen]:
    """`mllama serve` on a free loopback port; returns (base URL, process) once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mllama", "serve", "-m", str(gguf), "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return base, proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


@contextmanager
def running(gguf, *flags: str):
    """A server (start_server) for the `with` block; its base URL."""
    base, proc = start_server(gguf, *flags)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(gguf_f32):
    base, proc = start_server(gguf_f32, "--max-queue", "1", "--max-body", "1", "--ctx", "4096", "--parallel", "1")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def data_url() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}},
                                         {"type": "text", "text": "Describe this image."}]}]


def post(base, path, body: bytes, timeout=60):
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_models_and_health(server):
    models = client(server).models.list()
    assert len(models.data) == 1
    assert json.loads(urllib.request.urlopen(server + "/health").read())["status"] == "ok"


def test_streamed_equals_non_streamed_with_an_image(server):
    c = client(server)
    full = c.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens <= 16 and full.usage.prompt_tokens == 15
    stream = c.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=16, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text


def test_two_concurrent_requests_complete(server):
    results = []

    def one():
        r = client(server).chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=8)
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1]


def long_stream(base, stop: threading.Event, started: threading.Event):
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000, "stream": True,
                       "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.readline()
        started.set()
        while not stop.is_set() and r.readline():
            pass


def test_full_queue_answers_503_and_disconnect_frees_the_model(server):
    stop, started = threading.Event(), threading.Event()
    streamer = threading.Thread(target=long_stream, args=(server, stop, started))
    streamer.start()
    assert started.wait(60)
    waiting = threading.Thread(target=post, args=(server, "/v1/chat/completions",
                                                  json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()))
    waiting.start()
    time.sleep(0.5)  # the second request now waits in the queue (max 1)
    status, text = post(server, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode())
    assert status == 503 and "busy" in text
    stop.set()  # the streaming client goes away
    streamer.join(timeout=60)
    t0 = time.perf_counter()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and time.perf_counter() - t0 < 5
    t0 = time.perf_counter()
    status, _ = post(server, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode())
    assert status == 200 and time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "malformed JSON"),
    (b"[]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(),
     400, "cannot read image"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}).encode(),
     400, "allow-local-images"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}).encode(), 400, "must be a number"),
    (b'{"messages": [{"role": "user", "content": "x"}], "response_format": ' + b"[" * 100000, 400, "nested too deeply"),
], ids=["malformed", "not_object", "no_messages", "bad_image", "local_path", "bad_number", "too_deep"])
def test_bad_requests(server, body, status, fragment):
    got, text = post(server, "/v1/chat/completions", body)
    assert got == status, text
    assert fragment in json.loads(text)["error"]["message"]


def read_reply(sock: socket.socket) -> str:
    """The whole HTTP reply (the server answers and closes without reading the body)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_oversized_body_answers_413(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2097152\r\n\r\n{")
        reply = read_reply(sock)
    assert reply.startswith("HTTP/1.1 413") and "request body over" in reply


def test_ollama_chat(server):
    body = {"model": "x", "messages": [{"role": "user", "content": "Describe this image.", "images": [data_url().split(",", 1)[1]]}],
            "stream": False, "options": {"temperature": 0, "num_predict": 6}}
    status, text = post(server, "/api/chat", json.dumps(body).encode())
    assert status == 200, text
    reply = json.loads(text)
    assert reply["done"] is True and reply["eval_count"] <= 6 and reply["prompt_eval_count"] == 15


def ask(base: str, kind: str, text: str, max_tokens: int) -> tuple:
    """(content, finish reason, prompt tokens, completion tokens) of one request of a kind: an OpenAI
    request whole or streamed (usage in the last chunk), or an Ollama /api/chat request."""
    if kind == "ollama":
        body = {"messages": [{"role": "user", "content": text}], "stream": False,
                "options": {"temperature": 0, "num_predict": max_tokens}}
        status, reply = post(base, "/api/chat", json.dumps(body).encode(), timeout=120)
        assert status == 200, reply
        r = json.loads(reply)
        return r["message"]["content"], r["done_reason"], r["prompt_eval_count"], r["eval_count"]
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": kind == "stream", "stream_options": {"include_usage": True}}
    status, reply = post(base, "/v1/chat/completions", json.dumps(body).encode(), timeout=120)
    assert status == 200, reply
    if kind == "whole":
        r = json.loads(reply)
        usage = r["usage"]
        return r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"]
    chunks = [json.loads(line[6:]) for line in reply.splitlines() if line.startswith("data: {")]
    # OpenAI's include_usage: "usage": null on every chunk but a last one without choices, which has it
    *with_choices, last = chunks
    assert last["choices"] == [] and all(c["usage"] is None and len(c["choices"]) == 1 for c in with_choices)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    finish = with_choices[-1]["choices"][0]["finish_reason"]
    return content, finish, last["usage"]["prompt_tokens"], last["usage"]["completion_tokens"]


def test_overlapping_requests_each_carry_their_own_usage_and_finish_reason(gguf_f32):
    """Requests queued behind each other finish while the next one runs: each response must report its
    own token counts and finish reason (as each request gives alone), never another request's."""
    base, proc = start_server(gguf_f32, "--max-queue", "8")
    requests = [("whole", "Hi", 2), ("stream", "Tell me a story about a cat and a dog.", 7),
                ("ollama", "What is two plus two?", 4), ("whole", "Name one colour, then another one.", 9),
                ("stream", "Hello there", 1), ("ollama", "Count from one to ten, slowly please.", 5)]
    try:
        alone = [ask(base, *r) for r in requests]
        assert len({(a[2], a[3]) for a in alone}) == len(alone)  # every request's usage differs: a mix-up shows
        together: list = [None] * len(requests)

        def run(i: int) -> None:
            together[i] = ask(base, *requests[i])

        for _ in range(2):
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert together == alone
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ollama_client(base):
    from ollama import Client

    return Client(host=base, timeout=120)


def test_ollama_clients_list_show_ps_and_version(server):
    c = ollama_client(server)
    models = c.list().models
    assert len(models) == 1 and models[0].details.family == "mllama" and models[0].size > 0
    name = models[0].model
    shown = c.show(name)
    assert "vision" in shown.capabilities and shown.modelinfo["general.architecture"] == "mllama"
    assert "<|start_header_id|>" in shown.template
    running = c.ps().models
    assert [m.model for m in running] == [name] and running[0].context_length == 4096
    assert json.loads(urllib.request.urlopen(server + "/api/version").read())["version"]


def test_ollama_generate_with_the_official_client(server):
    c = ollama_client(server)
    image = base64.b64decode(data_url().split(",", 1)[1])
    whole = c.generate(model="x", prompt="Describe this image.", images=[image], options={"temperature": 0, "num_predict": 6})
    assert whole.done and whole.done_reason in ("stop", "length") and 0 < whole.eval_count <= 6
    assert whole.prompt_eval_count == 15 and whole.total_duration >= whole.prompt_eval_duration + whole.eval_duration > 0
    streamed = list(c.generate(model="x", prompt="Describe this image.", images=[image], stream=True,
                               options={"temperature": 0, "num_predict": 6}))
    assert "".join(part.response for part in streamed) == whole.response
    assert streamed[-1].done and streamed[-1].eval_count == whole.eval_count
    raw = c.generate(model="x", prompt="<|begin_of_text|>Once upon a time", raw=True, options={"temperature": 0, "num_predict": 3})
    assert raw.prompt_eval_count == 5 and raw.eval_count <= 3
    no_bos = c.generate(model="x", prompt="Once upon a time", raw=True, options={"temperature": 0, "num_predict": 3})
    assert no_bos.prompt_eval_count == 5 and no_bos.response == raw.response  # Ollama's raw mode puts the BOS first
    loaded = c.generate(model="x", prompt="")  # Ollama's way to load a model
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_chat_with_the_official_client_and_bad_requests(server):
    c = ollama_client(server)
    image = base64.b64decode(data_url().split(",", 1)[1])
    reply = c.chat(model="x", messages=[{"role": "user", "content": "Describe this image.", "images": [image]}],
                   options={"temperature": 0, "num_predict": 5})
    assert reply.done and reply.eval_count <= 5 and reply.prompt_eval_count == 15 and reply.eval_duration > 0
    for path, body, fragment in [("/api/generate", {"prompt": "Hi", "format": "yaml"}, "'format' must be"),
                                 ("/api/generate", {"prompt": 3}, "'prompt' must be a string"),
                                 ("/api/generate", {"prompt": "Hi", "images": ["%%%"]}, "base64"),
                                 ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "options": 1}, "'options'")]:
        status, text = post(server, path, json.dumps(body).encode())
        assert status == 400 and fragment in json.loads(text)["error"], (path, body, text)  # Ollama's shape
    from ollama import ResponseError

    with pytest.raises(ResponseError) as failed:  # the client reads the error as a string, as from Ollama
        c.generate(model="x", prompt="Hi", images=[b"not an image"])
    assert failed.value.status_code == 400 and "cannot read image" in failed.value.error
