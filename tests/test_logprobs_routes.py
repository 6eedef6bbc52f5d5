"""Log-probabilities on /v1/completions (OpenAI's legacy shape, through the official `openai` client) and on
Ollama's /api/generate and /api/chat, against a live server on the tiny fixture model: checked against
the Python API's items for the same prompt and against the log-softmax of the model's own logits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mllama
from mllama.generation.logprobs import completion_token, log_softmax
from test_server import client, post

PROMPT = "<|begin_of_text|>The lighthouse keeper said"
TOL = 1e-5


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=1024, n_seq_max=2) as m:
        yield m


def api_items(model, tokens: list[int], top: int, **sampling) -> list[dict]:
    """The Python API's logprobs items (OpenAI's chat shape) for a raw prompt."""
    return model.stream_text(tokens, logprobs=True, top_logprobs=top, **sampling).finish().logprobs


def name_bytes(name: str) -> bytes:
    """A legacy token name back to its bytes ("bytes:\\xNN..." or text)."""
    if name.startswith("bytes:"):
        return bytes(int(h, 16) for h in name[len("bytes:"):].split("\\x")[1:])
    return name.encode()


def check_legacy(lp: dict, top: int, greedy: bool) -> None:
    """Every step: logprobs <= 0, its top dict sorted, of the asked length (the sampled token added when
    it is not among them), holding the sampled token's own value; greedy: the top-1 is the sampled token."""
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    for token, value, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        values = list(tops.values())
        assert value <= 0 and all(v <= 0 for v in values)
        assert values == sorted(values, reverse=True)
        assert tops[token] == value
        assert sum(math.exp(v) for v in values) <= 1 + TOL
        if greedy:
            assert len(tops) == max(top, 1) and next(iter(tops)) == token
        else:
            assert len(tops) in (top, top + 1) and (len(tops) == top or list(tops)[-1] == token)


def joined(chunks) -> dict:
    """The legacy logprobs of streamed chunks, put end to end."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        for key in out:
            out[key] += ch.choices[0].logprobs.model_dump()[key]
    return out


def test_completions_logprobs_are_the_python_apis_and_the_logits(server, model):
    tokens = model.tokenize(PROMPT, special=True)
    whole = client(server).completions.create(model="x", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=5)
    choice = whole.choices[0]
    lp = choice.logprobs.model_dump()
    check_legacy(lp, 5, greedy=True)
    items = api_items(model, tokens, 5, max_tokens=10, temperature=0)
    assert len(lp["tokens"]) == len(items) == whole.usage.completion_tokens >= 2
    assert lp["tokens"] == [completion_token(bytes(it["bytes"])) for it in items]
    assert lp["token_logprobs"] == pytest.approx([it["logprob"] for it in items], abs=TOL)
    for tops, item in zip(lp["top_logprobs"], items):
        assert list(tops) == [completion_token(bytes(t["bytes"])) for t in item["top_logprobs"]]
        assert list(tops.values()) == pytest.approx([t["logprob"] for t in item["top_logprobs"]], abs=TOL)
    expected = np.sort(log_softmax(model.forward(tokens)[-1]))[::-1][:5]  # the first step, from the raw logits
    assert list(lp["top_logprobs"][0].values()) == pytest.approx(expected, abs=1e-4)
    text = choice.text
    assert b"".join(map(name_bytes, lp["tokens"])).decode() == text
    assert lp["text_offset"][0] == 0
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert token.startswith("bytes:") or text[offset:offset + len(token)] == token


def test_completions_streamed_logprobs_equal_the_whole_ones(server):
    c = client(server)
    whole = c.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    chunks = [ch for ch in c.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                                stream=True) if ch.choices]
    assert len(chunks) >= 3
    for ch in chunks:  # each chunk carries the tokens of its own text
        tokens = ch.choices[0].logprobs.tokens
        assert b"".join(map(name_bytes, tokens)).decode() == ch.choices[0].text
    streamed, lp = joined(chunks), whole.choices[0].logprobs.model_dump()
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=TOL)
    for a, b in zip(streamed["top_logprobs"], lp["top_logprobs"]):
        assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()), abs=TOL)


def test_completions_logprobs_sampled_at_temperature_1(server, model):
    """Sampled tokens outside the top k are added to their step's dict; values come before temperature,
    so the first step's top tokens are the greedy request's; logprobs 0 gives the sampled token alone."""
    c, tokens = client(server), model.tokenize(PROMPT, special=True)
    greedy = c.completions.create(model="x", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2)
    two = c.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=2, logprobs=2)
    for index, choice in enumerate(two.choices):
        lp = choice.logprobs.model_dump()
        check_legacy(lp, 2, greedy=False)
        first = {**greedy.choices[0].logprobs.top_logprobs[0], lp["tokens"][0]: lp["token_logprobs"][0]}
        assert lp["top_logprobs"][0] == pytest.approx(first, abs=TOL)
        items = api_items(model, tokens, 2, max_tokens=12, temperature=1.0, seed=3 + index)
        assert lp["token_logprobs"] == pytest.approx([it["logprob"] for it in items], abs=TOL)
    zero = c.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=4, logprobs=0)
    lp = zero.choices[0].logprobs.model_dump()
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    plain = c.completions.create(model="x", prompt=PROMPT, max_tokens=2, logprobs=None)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("extra, fragment", [
    ({"logprobs": 6}, "'logprobs' must be an integer from 0 to 5"),
    ({"logprobs": -1}, "'logprobs' must be an integer from 0 to 5"),
    ({"logprobs": True}, "'logprobs' must be an integer from 0 to 5"),
    ({"logprobs": "3"}, "'logprobs' must be an integer from 0 to 5"),
    ({"logprobs": 2.5}, "'logprobs' must be an integer from 0 to 5"),
    ({"logprobs": 2, "top_logprobs": 2}, "'top_logprobs' is for /v1/chat/completions"),
])
def test_completions_bad_logprobs(server, extra, fragment):
    status, text = post(server, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, **extra}).encode())
    assert status == 400 and fragment in json.loads(text)["error"]["message"], text


# --- Ollama's /api/chat and /api/generate ------------------------------------------------------------
TEXT_ONLY = [{"role": "user", "content": "Tell me about lighthouses."}]
GREEDY = {"temperature": 0, "num_predict": 8}


def ollama(server):
    from test_server import ollama_client

    return ollama_client(server)


def check_ollama(items: list[dict], top: int) -> None:
    """Greedy Ollama items: the top-1 alternative is the emitted token; logprobs <= 0, sorted, k of them."""
    for it in items:
        tops = [t["logprob"] for t in it["top_logprobs"]]
        assert it["logprob"] <= 0 and len(tops) == top and tops == sorted(tops, reverse=True)
        assert sum(math.exp(v) for v in tops) <= 1 + TOL
        if top:
            assert it["top_logprobs"][0]["token"] == it["token"] and tops[0] == it["logprob"]


def same_items(got: list[dict], expected: list[dict]) -> None:
    assert [it["token"] for it in got] == [it["token"] for it in expected]
    assert [it["logprob"] for it in got] == pytest.approx([it["logprob"] for it in expected], abs=TOL)
    for a, b in zip(got, expected):
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]
        assert [t["logprob"] for t in a["top_logprobs"]] == pytest.approx([t["logprob"] for t in b["top_logprobs"]],
                                                                          abs=TOL)


def ndjson_lines(server, path: str, body: dict) -> list[dict]:
    status, text = post(server, path, json.dumps(body).encode())
    assert status == 200, text
    return [json.loads(x) for x in text.splitlines()]


def test_ollama_chat_logprobs_through_the_client(server, model):
    c = ollama(server)
    whole = c.chat(model="x", messages=TEXT_ONLY, logprobs=True, top_logprobs=3, options=GREEDY)
    items = [it.model_dump() for it in whole.logprobs]
    assert len(items) == whole.eval_count >= 2
    check_ollama(items, 3)
    expected = model.chat(TEXT_ONLY, logprobs=True, top_logprobs=3, temperature=0, max_tokens=8)
    assert whole.message.content == expected["choices"][0]["message"]["content"]
    same_items(items, expected["choices"][0]["logprobs"]["content"])
    parts = list(c.chat(model="x", messages=TEXT_ONLY, logprobs=True, top_logprobs=3, options=GREEDY, stream=True))
    assert len(parts) >= 3 and parts[-1].done
    same_items([it.model_dump() for p in parts for it in p.logprobs], items)
    assert c.chat(model="x", messages=TEXT_ONLY, options=GREEDY).logprobs is None
    tools = [{"type": "function", "function": {"name": "light", "parameters": {"type": "object", "properties": {}}}}]
    held = list(c.chat(model="x", messages=TEXT_ONLY, tools=tools, logprobs=True, options=GREEDY, stream=True))
    # with tools a text reply streams too (held back only while it may be a call): each line its tokens' items
    assert sum(len(p.logprobs) for p in held) == held[-1].eval_count and held[-1].logprobs == []
    assert len(held) > 2 and not held[0].message.content.lstrip().startswith("{")  # (a text reply: streamed)


def test_ollama_generate_logprobs_equal_the_completions_routes(server, model):
    """The same raw prompt on /api/generate and /v1/completions gives the same numbers; each NDJSON line
    carries its tokens (their bytes spell its text)."""
    c = ollama(server)
    whole = c.generate(model="x", prompt=PROMPT, raw=True, logprobs=True, top_logprobs=2, options=GREEDY)
    items = [it.model_dump() for it in whole.logprobs]
    check_ollama(items, 2)
    legacy = client(server).completions.create(model="x", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert whole.response == legacy.choices[0].text
    assert [it["logprob"] for it in items] == pytest.approx(lp.token_logprobs, abs=TOL)
    for it, tops in zip(items, lp.top_logprobs):
        assert [t["logprob"] for t in it["top_logprobs"]] == pytest.approx(list(tops.values()), abs=TOL)
    lines = ndjson_lines(server, "/api/generate", {"prompt": PROMPT, "raw": True, "logprobs": True,
                                                   "top_logprobs": 2, "options": GREEDY})
    for ln in lines:
        assert b"".join(bytes(it["bytes"]) for it in ln["logprobs"]).decode() == ln["response"]
    same_items([it for ln in lines for it in ln["logprobs"]], items)
    assert [it["bytes"] for ln in lines for it in ln["logprobs"]] == \
        [list(name_bytes(t)) for t in lp.tokens]
    zero = c.generate(model="x", prompt=PROMPT, raw=True, logprobs=True, options=GREEDY)
    assert [it.top_logprobs for it in zero.logprobs] == [[]] * len(items)
    assert [it.logprob for it in zero.logprobs] == pytest.approx([it["logprob"] for it in items], abs=TOL)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("extra, fragment", [
    ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer from 0 to 20"),
    ({"logprobs": True, "top_logprobs": -1}, "'top_logprobs' must be an integer from 0 to 20"),
    ({"logprobs": True, "top_logprobs": "3"}, "'top_logprobs' must be an integer from 0 to 20"),
    ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ({"logprobs": "yes"}, "'logprobs' must be a boolean"),
])
def test_ollama_bad_logprobs(server, path, extra, fragment):
    body = {"messages": TEXT_ONLY, "prompt": "hi", "options": {"num_predict": 2}, **extra}
    status, text = post(server, path, json.dumps(body).encode())
    assert status == 400 and fragment in json.loads(text)["error"], text  # Ollama's shape: {"error": "..."}
