"""Ollama's API where its clients depend on the details: a system prompt next to images (Ollama's template
accepts it, Meta's refuses it), tool calls streamed as Ollama streams them (text at once, a call as
tool_calls with an id and index), what Ollama refuses for this model refused the same way, Ollama's routes
for what mllama does not do answered 501 (pull of the served model: success), /api/show's checks, HEAD
probes; and special tokens a model generates give no text unless asked (vLLM's skip_special_tokens)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import mllama.generation.scheduler as scheduler
from test_server_protocol import app, model  # noqa: F401 (the module's model, n_seq_max 2, and its app)


@pytest.fixture
def forced(monkeypatch, model):
    """forced(ids): the next greedy replies are these tokens, then <|eot_id|>."""
    script: list[int] = []
    end = model.tokenizer.token_id("<|eot_id|>")

    def sample(logits, history, params, rng, allowed=None):
        return script.pop(0) if script else end

    monkeypatch.setattr(scheduler, "sample", sample)
    return lambda ids: script.__init__(ids)


def png() -> str:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def lines(response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_a_system_prompt_next_to_images_as_ollama_writes_it(app, model):
    """Ollama's llama3.2-vision template writes a system turn first; Meta's template (the OpenAI routes, the
    Python API) refuses it."""
    options = {"temperature": 0, "num_predict": 4}
    image = png()
    chat = app.post("/api/chat", json={"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "What is it?", "images": [image]}],
                                       "stream": False, "options": options})
    generate = app.post("/api/generate", json={"system": "Be brief.", "prompt": "What is it?", "images": [image],
                                               "stream": False, "options": options})
    assert chat.status_code == generate.status_code == 200, (chat.text, generate.text)
    bare, _ = model.chat_prompt([{"role": "user", "content": "What is it?", "images": [image]}])
    system = model.tokenize("<|start_header_id|>system<|end_header_id|>\n\n", special=True) + \
        model.tokenize("Be brief.") + model.tokenize("<|eot_id|>", special=True)
    expected = bare[:1] + system + bare[1:]
    assert chat.json()["prompt_eval_count"] == generate.json()["prompt_eval_count"] == len(expected)
    assert model.chat_prompt([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is it?", "images": [image]}],
                             system_with_images=True)[0] == expected
    assert chat.json()["message"]["content"] == generate.json()["response"]
    refused = app.post("/v1/chat/completions", json={"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
                                     {"type": "text", "text": "What is it?"}]}]})
    assert refused.status_code == 400 and "incompatible with system messages" in refused.text


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_tool_calls_stream_as_ollama_streams_them(app, model, forced):
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    forced(model.tokenize(call))
    items = lines(app.post("/api/chat", json={"messages": ASK, "tools": TOOLS, "options": {"temperature": 0}}))
    assert [i["done"] for i in items] == [False, True] and items[0]["message"]["content"] == ""
    calls = items[0]["message"]["tool_calls"]
    assert calls == [{"id": calls[0]["id"], "function": {"index": 0, "name": "get_weather",
                                                          "arguments": {"city": "Paris"}}}]
    assert calls[0]["id"].startswith("call_") and items[-1]["done_reason"] == "stop"
    words = " It is sunny in Paris today, as every day."
    forced(model.tokenize(words))
    items = lines(app.post("/api/chat", json={"messages": ASK, "tools": TOOLS, "options": {"temperature": 0}}))
    texts = [i["message"]["content"] for i in items if not i["done"]]
    assert len(texts) == len(model.tokenize(words)) and "".join(texts) == words  # a piece a line, not held back
    assert all("tool_calls" not in i["message"] for i in items)
    forced(model.tokenize('{"not": "a call"}'))
    items = lines(app.post("/api/chat", json={"messages": ASK, "tools": TOOLS, "options": {"temperature": 0}}))
    assert "".join(i["message"]["content"] for i in items) == '{"not": "a call"}'


def test_special_tokens_give_no_text_unless_asked(app, model, forced):
    tag = model.tokenizer.token_id("<|python_tag|>")
    reserved = model.tokenizer.token_id("<|reserved_special_token_0|>")
    ids = model.tokenize("Hello") + [reserved, tag] + model.tokenize(" x_y")
    forced(list(ids))
    assert model.chat(ASK, temperature=0)["choices"][0]["message"]["content"] == "Hello x_y"
    forced(list(ids))
    cut = model.chat(ASK, temperature=0, stop=["_"])  # a stop string never cuts a special token's text
    assert cut["choices"][0]["message"]["content"] == "Hello x"
    forced(list(ids))  # but one that names a special token still stops the reply there
    named = model.chat(ASK, temperature=0, stop=["<|python_tag|>"])["choices"][0]
    assert (named["message"]["content"], named["finish_reason"]) == ("Hello", "stop")
    forced(list(ids))
    shown = model.chat(ASK, temperature=0, skip_special_tokens=False)["choices"][0]["message"]["content"]
    assert shown == "Hello<|reserved_special_token_0|><|python_tag|> x_y"
    forced(list(ids))
    shown = app.post("/v1/chat/completions", json={"messages": ASK, "skip_special_tokens": False})
    assert shown.json()["choices"][0]["message"]["content"] == "Hello<|reserved_special_token_0|><|python_tag|> x_y"
    bad = app.post("/v1/chat/completions", json={"messages": ASK, "skip_special_tokens": "no"})
    assert bad.status_code == 400 and "'skip_special_tokens' must be true or false" in bad.text


@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_offsets_leave_out_skipped_special_tokens(app, model, forced, stream):
    """/v1/completions' text_offset points into the text the reply has: a skipped special token takes none."""
    ids = model.tokenize("Hello") + [model.tokenizer.token_id("<|python_tag|>")] + model.tokenize(" x_y, z")
    forced(list(ids))
    reply = app.post("/v1/completions", json={"prompt": "Hi", "logprobs": 1, "max_tokens": 16, "stream": stream})
    if stream:
        chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
        offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    else:
        choice = reply.json()["choices"][0]
        text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text == "Hello x_y, z" and "<|python_tag|>" in tokens and len(offsets) == len(ids)
    for i, (token, offset) in enumerate(zip(tokens, offsets)):
        if token == "<|python_tag|>":
            assert offset == offsets[i + 1] == len("Hello")
        else:
            assert text[offset:offset + len(token)] == token, (token, offset)


@pytest.mark.parametrize("extra, fragment", [
    ({"think": True}, "does not support thinking"), ({"think": "high"}, "does not support thinking"),
    ({"suffix": "}"}, "does not support insert"), ({"template": "{{ .Prompt }}"}, "'template' is not supported"),
    ({"context": [1, 2, 3]}, "'context' (deprecated by Ollama) is not supported"),
    ({"raw": True, "system": "Be brief."}, "raw mode does not support template, system, or context"),
])
def test_what_ollama_refuses_is_refused(app, extra, fragment):
    reply = app.post("/api/generate", json={"prompt": "Hi", "stream": False, **extra})
    assert reply.status_code == 400 and fragment in reply.json()["error"], reply.text
    assert app.post("/api/generate", json={"prompt": "Hi", "stream": False, "think": False,
                                           "options": {"num_predict": 1}}).status_code == 200


def test_routes_for_what_mllama_does_not_do(app, model):
    for method, path in (("post", "/api/embed"), ("post", "/api/embeddings"), ("post", "/api/create"),
                         ("post", "/api/copy"), ("post", "/api/push"), ("delete", "/api/delete")):
        reply = app.request(method.upper(), path, json={"model": model.name, "input": "x"})
        assert reply.status_code == 501 and path in reply.json()["error"], (path, reply.text)
    assert "embeddings" in app.post("/api/embed", json={"model": "x", "input": "y"}).json()["error"]
    assert lines(app.post("/api/pull", json={"model": model.name})) == [{"status": "success"}]
    latest = app.post("/api/pull", json={"model": model.name + ":latest", "stream": False})
    assert latest.json() == {"status": "success"}
    other = app.post("/api/pull", json={"model": "qwen3:8b"})
    assert other.status_code == 501 and "does not pull" in other.json()["error"]
    assert app.post("/api/show", json={}).json() == {"error": "model is required"}
    show = app.post("/api/show", json={"model": model.name}).json()
    assert show["details"]["parameter_size"].endswith("M") and "vision" in show["capabilities"]
    for path in ("/api/tags", "/api/version", "/"):
        assert app.head(path).status_code == 200, path
    load = app.post("/api/generate", json={"prompt": "", "images": [png()]}).json()  # Ollama: no prompt, a load
    assert load["done"] and load["done_reason"] == "load" and load["response"] == ""


def test_options_that_are_not_done_are_said_once(app, monkeypatch, caplog):
    from mllama.server import ollama_requests

    monkeypatch.setattr(ollama_requests, "_said", set())
    options = {"num_ctx": 8192, "mirostat": 1, "repeat_last_n": 0, "num_predict": 2, "temperature": 0}
    with caplog.at_level("WARNING", logger="mllama.server"):
        for _ in range(2):
            reply = app.post("/api/generate", json={"prompt": "Hi", "stream": False, "options": options})
            assert reply.status_code == 200
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert said == ["Ollama option 'mirostat' ignored: not done by mllama",
                    "Ollama option 'num_ctx' ignored: the server's own flags set it (mllama serve --help)"]


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "Hi", "raw": "false"}, "'raw' must be true or false"),  # (read as true: the template was lost)
    ({"prompt": "Hi", "options": []}, "'options' must be an object"),  # (falsy values had been no options)
    ({"prompt": "Hi", "options": False}, "'options' must be an object"),
    ({"prompt": "Hi", "system": ["a"]}, "'system' must be a string"),  # (had blamed a "message 0")
    ({"prompt": "Hi", "keep_alive": "garbage"}, "'keep_alive' must be a duration"),
    ({"prompt": "Hi", "keep_alive": True}, "'keep_alive' must be a duration"),
    ({"prompt": "Hi", "keep_alive": {}}, "'keep_alive' must be a duration"),
])
def test_fields_of_the_wrong_kind_are_refused(app, body, fragment):
    reply = app.post("/api/generate", json={"stream": False, **body})
    assert reply.status_code == 400 and fragment in reply.json()["error"], reply.text


def test_a_number_too_long_for_python_is_malformed_json(app):
    for path in ("/api/chat", "/v1/chat/completions"):
        reply = app.post(path, content=b'{"messages": [], "seed": ' + b"9" * 5000 + b"}",
                         headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "a number too long" in reply.text, reply.text  # (named sys.set_int_...)


@pytest.mark.parametrize("keep_alive, reason", [
    (0, "unload"), (0.5, "unload"), ("0", "unload"), ("0s", "unload"), ("0h", "unload"), ("0ms", "unload"),
    ("0.0s", "unload"), ("0h0m", "unload"), (-1, "load"), ("5m", "load"), ("1h30m", "load"), ("-1s", "load"),
    (None, "load"), (300, "load"),
])
def test_keep_alive_is_read_as_ollama_reads_it(app, keep_alive, reason):
    """A Go duration string, or seconds (truncated); zero unloads (only 0, "0", "0s" and "0m" had)."""
    reply = app.post("/api/chat", json={"messages": [], "keep_alive": keep_alive})
    assert reply.status_code == 200 and reply.json()["done_reason"] == reason, (keep_alive, reply.text)


def test_tool_messages_take_no_images_and_calls_take_objects(app):
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1, 2]}}]}
    reply = app.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi"}, call], "stream": False})
    assert reply.status_code == 400 and "arguments must be a JSON object, not list" in reply.json()["error"]
    tool = {"role": "tool", "content": "{}", "images": [png()]}  # (the image had been decoded, then dropped)
    reply = app.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi"}, tool], "stream": False})
    assert reply.status_code == 400 and "images go in user messages, not in a tool message" in reply.json()["error"]
