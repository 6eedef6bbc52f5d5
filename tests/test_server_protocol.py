"""The server's protocol as real clients rely on it: an error after the first token ends each kind of answer in
its API's shape (OpenAI's in-band error event, Ollama's closing error line, a JSON error for a whole answer),
Ollama's error shape and load/unload requests, OpenAI's request checks, error fields and usage chunk, CORS; and on
a live server, a client that leaves a whole (non-streamed) answer frees its sequence, and the wait queue takes
exactly --parallel + --max-queue requests."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import mllama
from mllama.generation.scheduler import Scheduler
from mllama.server.ollama_routes import OLLAMA_API_VERSION
from test_server import running

HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=512, n_seq_max=2) as m:
        yield m


@pytest.fixture(scope="module")
def app(model):
    from fastapi.testclient import TestClient

    from mllama.server.app import create_app

    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def fail_at_second_token(monkeypatch):
    """Every request fails when it samples its second token: after its first piece has been sent."""
    sample = Scheduler._sample_stream

    def failing(self, s, logits, drawn):
        if s.record.completion_tokens >= 1:
            raise RuntimeError("boom after the first token")
        return sample(self, s, logits, drawn)

    monkeypatch.setattr(Scheduler, "_sample_stream", failing)


def sse_events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_an_error_after_the_first_token_ends_each_answer_in_its_apis_shape(app, model, fail_at_second_token):
    chat = {"messages": HI, "max_tokens": 8, "temperature": 0}
    events = sse_events(app.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    pieces = [json.loads(e) for e in events if e != "[DONE]"]
    assert any(p.get("choices") and p["choices"][0]["delta"].get("content") for p in pieces)  # the first token came
    assert "boom after the first token" in pieces[-1]["error"]["message"] and events[-1] != "[DONE]"
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "Hi", "max_tokens": 8})):
        whole = app.post(path, json=body)
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error", whole.text
    lines = app.post("/api/chat", json={"messages": HI, "options": {"num_predict": 8, "temperature": 0}}).text
    items = [json.loads(line) for line in lines.splitlines()]
    assert items[0]["message"]["content"] and items[-1] == {"error": "boom after the first token"}
    whole = app.post("/api/generate", json={"prompt": "Hi", "stream": False, "options": {"num_predict": 8}})
    assert whole.status_code == 500 and whole.json() == {"error": "internal error"}
    assert model.scheduler.running == [] and not any(model.scheduler.busy)


def test_a_lost_worker_is_503_with_its_message_and_an_internal_error_is_logged(app, monkeypatch, caplog):
    """A failed device or RPC worker (C status "backend error") is the server's state, said to the client (503);
    any other fault is a 500 whose details go to the server's log only."""
    from mllama._native.errors import MllamaError

    fault: list[BaseException] = []

    def failing(self, s, logits, drawn):
        raise fault[0]

    monkeypatch.setattr(Scheduler, "_sample_stream", failing)
    lost = "RPC worker 127.0.0.1:50052 was lost: connection reset"
    fault[:] = [MllamaError(lost, "backend error")]
    whole = app.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4})
    assert whole.status_code == 503 and whole.json()["error"]["message"] == lost, whole.text
    whole = app.post("/api/generate", json={"prompt": "Hi", "stream": False, "options": {"num_predict": 4}})
    assert whole.status_code == 503 and whole.json() == {"error": lost}
    fault[:] = [ZeroDivisionError("a bug's details")]
    with caplog.at_level("ERROR", logger="mllama.server"):
        whole = app.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4})
    assert whole.status_code == 500 and "details" not in whole.text
    assert "internal error: ZeroDivisionError: a bug's details" in caplog.text


def test_ollama_error_shape_load_requests_and_probes(app):
    bad = app.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi", "images": ["%%%"]}]})
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str) and "base64" in bad.json()["error"]
    path = app.post("/api/chat", json={"messages": [{"role": "user", "content": [{"type": "image",
                                                                                  "image": "/etc/hostname"}]}]})
    assert path.status_code == 400 and "not part of the API" in path.json()["error"]
    for body, reason in (({"messages": []}, "load"), ({}, "load"), ({"messages": [], "keep_alive": 0}, "unload")):
        reply = app.post("/api/chat", json=body).json()
        assert reply["done"] and reply["done_reason"] == reason and reply["message"]["content"] == ""
    assert app.post("/api/generate", json={"keep_alive": "0s"}).json()["done_reason"] == "unload"
    assert app.get("/").text == "Ollama is running" and app.head("/").status_code == 200
    assert app.get("/api/version").json()["version"] == OLLAMA_API_VERSION
    assert app.get("/api/nope").json() == {"error": "GET /api/nope: Not Found"}
    wrong = app.get("/v1/nope")
    assert wrong.status_code == 404 and wrong.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, status, fragment, param", [
    ({"temperature": -1}, 400, "'temperature' must be >= 0", "temperature"),
    ({"top_p": 7}, 400, "top_p must be within [0, 1]", None),
    ({"presence_penalty": 99}, 400, "presence_penalty must be within [-2, 2]", None),
    ({"frequency_penalty": -2e38}, 400, "frequency_penalty must be within [-2, 2]", None),
    ({"max_tokens": 2.7}, 400, "'max_tokens' must be an integer", "max_tokens"),
    ({"repeat_penalty": 0}, 400, "repeat_penalty must be > 0", None),
    ({"min_p": 2}, 400, "min_p must be within [0, 1]", None),
    ({"logit_bias": {"5": 10}}, 400, "'logit_bias' is not supported", "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 123}}]}]}, 400,
     "url must be a string", "messages"),
    ({"messages": [{"role": "bogus", "content": "Hi"}]}, 400, "unknown role 'bogus'", None),
    ({"messages": [{"role": 5, "content": "Hi"}]}, 400, "unknown role 5", None),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                      "AAAA"}}]}, *HI]},
     400, "images go in user messages", None),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "the context holds", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "/etc/hostname"}]}]}, 400,
     "not part of the API", "messages"),  # no file of the server's is read without --allow-local-images
    ({"messages": [{"role": "user", "content": "Hi", "images": ["/etc/hostname"]}]}, 400, "'images' is Ollama's",
     "messages"),
])
def test_openai_request_checks(app, extra, status, fragment, param):
    reply = app.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **extra})
    error = reply.json()["error"]
    assert reply.status_code == status and fragment in error["message"] and error["param"] == param, reply.text
    assert error["code"] == ("context_length_exceeded" if "context" in fragment else None)


def test_openai_n_null_developer_role_models_and_usage_chunk(app, model):
    body = {"messages": HI, "max_tokens": 3, "temperature": 0}
    assert app.post("/v1/chat/completions", json={**body, "n": None}).json()["choices"][0]["index"] == 0
    system = app.post("/v1/chat/completions", json={**body, "messages": [{"role": "system", "content": "Be brief."},
                                                                         *HI]}).json()
    developer = app.post("/v1/chat/completions", json={**body, "messages": [{"role": "developer",
                                                                             "content": "Be brief."}, *HI]}).json()
    assert developer["usage"] == system["usage"] and developer["choices"] == system["choices"]
    assert app.get(f"/v1/models/{model.name}").json()["id"] == model.name
    missing = app.get("/v1/models/gpt-4").json()["error"]
    assert missing["code"] == "model_not_found" and missing["param"] == "model"
    events = [json.loads(e) for e in sse_events(app.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}}).text) if e != "[DONE]"]
    *chunks, last = events
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3


def test_cors_for_local_pages_and_named_origins(app):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    local = app.options("/api/chat", headers={"Origin": "http://localhost:3000", **preflight})
    assert local.status_code == 200 and local.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = app.options("/api/chat", headers={"Origin": "https://example.com", **preflight})
    assert "access-control-allow-origin" not in other.headers


def metric(base, name: str) -> float:
    """A metric's value from /metrics of a server at `base` (a URL) or of a TestClient."""
    reply = httpx.get(base + "/metrics") if isinstance(base, str) else base.get("/metrics")
    for line in reply.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_a_client_leaving_a_whole_answer_frees_its_sequence(gguf_f32):
    with running(gguf_f32, "--ctx", "1024", "--parallel", "2") as base:
        body = {"messages": HI, "max_tokens": 1000, "temperature": 0}
        for _ in range(2):  # answers that end normally are not cancellations
            httpx.post(base + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert metric(base, "mllama_requests_cancelled_total") == 0
        generated = metric(base, "mllama_generated_tokens_total")
        with pytest.raises(httpx.TimeoutException):  # ~1000 tokens would take seconds: the client gives up
            httpx.post(base + "/v1/chat/completions", json=body, timeout=0.5)
        for _ in range(100):
            if httpx.get(base + "/health").json()["running"] == 0:
                break
            time.sleep(0.05)
        assert httpx.get(base + "/health").json()["running"] == 0
        assert metric(base, "mllama_requests_cancelled_total") == 1
        assert metric(base, "mllama_generated_tokens_total") - generated < 500


def test_the_wait_queue_takes_exactly_parallel_plus_max_queue(gguf_f32):
    with running(gguf_f32, "--ctx", "1024", "--parallel", "2", "--max-queue", "3") as base:
        codes: list[int] = []

        def ask(i: int) -> None:
            body = {"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 200, "temperature": 0}
            codes.append(httpx.post(base + "/v1/chat/completions", json=body, timeout=300).status_code)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert sorted(codes) == [200] * 5 + [503] * 3


def test_requests_that_come_while_the_server_stops(model, monkeypatch):
    """One prepared while the server stops ends with 503 "the request was cancelled" (it had run to its end, or
    was cut by uvicorn's grace period: a plain-text 500); one that comes after is refused at once."""
    from fastapi.testclient import TestClient

    from mllama.server.app import create_app

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0}
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        build = model.build_request

        def build_while_stopping(*args, **kwargs):
            client.app.state.stop_requests()  # (the signal comes while the request is prepared)
            return build(*args, **kwargs)
        monkeypatch.setattr(model, "build_request", build_while_stopping)
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 503 and reply.json()["error"]["message"] == "the request was cancelled"
        monkeypatch.undo()
        late = client.post("/api/chat", json={**body, "stream": False})
        assert late.status_code == 503 and late.json() == {"error": "the server is shutting down"}
    assert model.scheduler.n_waiting == 0 and not model.scheduler.running


def test_health_and_metrics_count_a_request_being_prepared(model, monkeypatch):
    """A request whose prompt and images are being prepared is `preparing` in /health and /metrics, not `waiting`
    (/health had counted it as waiting, /metrics not at all)."""
    from fastapi.testclient import TestClient

    from mllama.server.app import create_app

    build, entered, release, replies = model.build_request, threading.Event(), threading.Event(), []

    def slow_build(*args, **kwargs):
        entered.set()
        release.wait(60)
        return build(*args, **kwargs)
    body = {"messages": HI, "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        monkeypatch.setattr(model, "build_request", slow_build)
        asking = threading.Thread(target=lambda: replies.append(client.post("/v1/chat/completions", json=body)))
        asking.start()
        try:
            assert entered.wait(60)
            health = client.get("/health").json()
            assert (health["running"], health["waiting"], health["preparing"]) == (0, 0, 1)
            assert (metric(client, "mllama_requests_waiting"), metric(client, "mllama_requests_preparing")) == (0, 1)
        finally:
            release.set()
            asking.join(60)
        assert replies[0].status_code == 200 and client.get("/health").json()["preparing"] == 0
        assert metric(client, "mllama_requests_preparing") == 0
