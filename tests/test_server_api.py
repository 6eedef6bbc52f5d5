"""OpenAI's /v1/completions and log-probabilities (server and Model.chat), and `mllama serve --ollama`,
driven by the official `openai` client against a live server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

import mllama
from mllama.cli import build_parser
from mllama.cli.serve import address
from mllama.generation.logprobs import log_softmax
from test_server import client, post

PROMPT = "<|begin_of_text|>The lighthouse keeper said"
TEXT_ONLY = [{"role": "user", "content": "Tell me about lighthouses."}]


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=512) as m:
        yield m


def test_completions_whole_streamed_and_token_ids(server, model):
    c = client(server)
    whole = c.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    text, choice = whole.choices[0].text, whole.choices[0]
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(model.tokenize(PROMPT, special=True))  # it starts with the BOS
    no_bos = c.completions.create(model="x", prompt=PROMPT.removeprefix("<|begin_of_text|>"), max_tokens=12,
                                  temperature=0)  # one is put first, as llama.cpp's server and vLLM do
    assert no_bos.usage.prompt_tokens == whole.usage.prompt_tokens and no_bos.choices[0].text == whole.choices[0].text
    assert text == model.generate(PROMPT, max_tokens=12, temperature=0, stream=False)
    chunks = list(c.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = c.completions.create(model="x", prompt=model.tokenize(PROMPT, special=True), max_tokens=12, temperature=0)
    assert ids.choices[0].text == text
    default = c.completions.create(model="x", prompt=PROMPT, temperature=0)  # OpenAI's default: 16 tokens
    assert default.usage.completion_tokens <= 16 and default.choices[0].text.startswith(text)


def test_completions_stop_seed_and_n(server):
    c = client(server)
    text = c.completions.create(model="x", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = text[4:7]
    assert len(text) > 8 and stop
    cut = c.completions.create(model="x", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    two = c.completions.create(model="x", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=2)
    again = c.completions.create(model="x", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert [ch.text for ch in two.choices] == [ch.text for ch in again.choices]
    assert 2 <= two.usage.completion_tokens <= 16


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "hi", "echo": True}, "'echo': true is not supported"),
    ({"prompt": "hi", "logprobs": 6}, "'logprobs' must be an integer from 0 to 5"),
    ({"prompt": "hi", "suffix": "x"}, "'suffix' is not supported"),
    ({"prompt": "hi", "best_of": 3}, "'best_of' is not supported"),
    ({"prompt": "hi", "logit_bias": {"1": 5}}, "'logit_bias' is not supported"),
    ({"prompt": ""}, "'prompt' must be"),
    ({"prompt": ["a", "b"]}, "'prompt' must be"),
    ({"prompt": [1, 2.5]}, "'prompt' must be"),
    ({"prompt": [1, 999999]}, "token id 999999 is outside the vocabulary"),
    ({"prompt": "hi", "max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"prompt": "hi", "n": 0}, "'n' must be a positive integer"),
    ({"prompt": "hi", "n": 99}, "at most 2 sequences at once (mllama serve --parallel)"),  # (had: n_seq_max)
])
def test_completions_bad_requests(server, body, fragment):
    status, text = post(server, "/v1/completions", json.dumps(body).encode())
    assert status == 400, text
    assert fragment in json.loads(text)["error"]["message"]


def check_items(items, content: str, top: int) -> None:
    """Greedy items: the drawn token is the most likely one; the bytes spell the reply."""
    assert b"".join(bytes(it["bytes"]) for it in items).decode() == content
    for it in items:
        assert it["logprob"] <= 0 and len(it["top_logprobs"]) == top
        tops = [t["logprob"] for t in it["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert it["token"] == it["top_logprobs"][0]["token"] and it["logprob"] == tops[0]


def test_model_chat_logprobs_are_the_log_softmax_of_the_logits(model):
    reply = model.chat(TEXT_ONLY, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    items = reply["choices"][0]["logprobs"]["content"]
    assert len(items) == reply["usage"]["completion_tokens"]
    check_items(items, reply["choices"][0]["message"]["content"], 3)
    tokens, _ = model.chat_prompt(TEXT_ONLY)
    expected = log_softmax(model.forward(tokens)[-1])
    assert items[0]["logprob"] == pytest.approx(expected.max(), abs=1e-4)
    assert items[0]["bytes"] == list(model.tokenizer.token_bytes(int(np.argmax(expected))))
    streamed = [ch["choices"][0]["logprobs"] for ch in model.chat(TEXT_ONLY, max_tokens=6, temperature=0,
                                                                  logprobs=True, stream=True)]
    assert [it["token"] for lp in streamed if lp for it in lp["content"]] == [it["token"] for it in items]
    assert model.chat(TEXT_ONLY, max_tokens=2)["choices"][0]["logprobs"] is None
    with pytest.raises(ValueError, match="'top_logprobs' must be an integer from 0 to 20"):
        model.chat(TEXT_ONLY, logprobs=True, top_logprobs=21)


def test_server_chat_logprobs_whole_and_streamed(server):
    c = client(server)
    whole = c.chat.completions.create(model="x", messages=TEXT_ONLY, max_tokens=8, temperature=0, logprobs=True,
                                      top_logprobs=2)
    items = [it.model_dump() for it in whole.choices[0].logprobs.content]
    assert len(items) == whole.usage.completion_tokens
    check_items(items, whole.choices[0].message.content, 2)
    chunks = list(c.chat.completions.create(model="x", messages=TEXT_ONLY, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True))
    streamed = [it.model_dump() for ch in chunks if ch.choices[0].logprobs for it in ch.choices[0].logprobs.content]
    assert [it["token"] for it in streamed] == [it["token"] for it in items]
    assert [it["logprob"] for it in streamed] == pytest.approx([it["logprob"] for it in items], abs=1e-5)
    plain = c.chat.completions.create(model="x", messages=TEXT_ONLY, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("extra, fragment", [
    ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer from 0 to 20"),
    ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ({"logprobs": "yes"}, "'logprobs' must be a boolean"),
])
def test_chat_logprobs_bad_requests(server, extra, fragment):
    body = {"messages": TEXT_ONLY, "max_tokens": 2, **extra}
    status, text = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and fragment in json.loads(text)["error"]["message"], text


def test_serve_ollama_address_and_a_taken_port(tmp_path):
    parse = build_parser().parse_args
    assert address(parse(["serve", "--ollama"])) == ("127.0.0.1", 11434)
    assert address(parse(["serve", "--ollama", "--port", "9000", "--host", "0.0.0.0"])) == ("0.0.0.0", 9000)
    assert address(parse(["serve"])) == ("127.0.0.1", 8080)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the port is checked before the model loads: this model does not exist
        proc = subprocess.run([sys.executable, "-m", "mllama", "serve", "--ollama", "--port", str(port),
                               "-m", str(tmp_path / "absent.gguf")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Ollama itself may be running: stop it, or pass --port" in proc.stderr
