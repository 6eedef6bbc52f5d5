"""Requests at the edges of what the APIs accept, as clients send them: values of the wrong type or out of
range are refused with the field named (400 over HTTP, TypeError/ValueError in Python) before anything is
queued or allocated; a request that fails after it was queued is stopped, not generated for no one; the
conventions clients carry over from Ollama, llama.cpp and vLLM (seed -1, top_k -1, num_predict as a float,
base64 in lines, a last assistant message continued) mean what they mean there."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama.server.requests import RequestError, sampling
from test_server_protocol import app, model  # noqa: F401 (the module's model, n_ctx 512, n_seq_max 2, and its app)

HI = [{"role": "user", "content": "Hi"}]


def png_bytes(seed: int = 3) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def idle(model) -> bool:
    scheduler = model.scheduler
    return scheduler.running == [] and scheduler.n_waiting == 0 and not any(scheduler.busy)


@pytest.mark.parametrize("n", [3, 2**64])
def test_n_beyond_the_sequences_is_refused_before_anything_is_allocated(app, model, n):
    started = time.perf_counter()
    for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
        reply = app.post(path, json={**body, "n": n, "max_tokens": 2})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == "n", error
        assert f"'n' is {n}: this server runs at most 2 sequences at once (mllama serve --parallel)" in error["message"]
    assert time.perf_counter() - started < 30  # (2**64 streams were being built: memory without bound, no reply)
    with pytest.raises(ValueError, match=r"within \[1, 2\]"):
        model.chat(HI, n=2**64)
    assert idle(model)


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": HI}),
                                        ("/v1/completions", {"prompt": "Hi"})])
@pytest.mark.parametrize("extra, param", [
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": False, "stream_options": [1]}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "no"}}, "include_usage"),
    ({"stream": "false"}, "stream"),
])
def test_bad_stream_fields_are_refused_and_nothing_runs(app, model, path, body, extra, param):
    reply = app.post(path, json={**body, **extra})  # no max_tokens: a leak would run to the end of the context
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert idle(model)


def test_ollama_stream_and_num_predict_fields(app, model):
    for path, body in (("/api/chat", {"messages": HI}), ("/api/generate", {"prompt": "Hi"})):
        assert app.post(path, json={**body, "stream": "false"}).status_code == 400
        whole = app.post(path, json={**body, "stream": False, "options": {"num_predict": 2.0, "temperature": 0}})
        assert whole.status_code == 200 and whole.json()["eval_count"] <= 2, whole.text
        for bad, said in (("2", "a number"), (2.5, "an integer, not 2.5"), (True, "a number")):
            reply = app.post(path, json={**body, "stream": False, "options": {"num_predict": bad}})
            assert reply.status_code == 400 and reply.json()["error"] == f"'num_predict' must be {said}", reply.text
    assert app.post("/api/pull", json={"model": model.name, "stream": "no"}).status_code == 400
    assert idle(model)


def test_sampling_conventions_of_other_servers():
    assert "seed" not in sampling({"seed": -1}) and sampling({"seed": 7})["seed"] == 7  # -1: a random seed
    assert sampling({"top_k": -1})["top_k"] == -1 and mllama.SamplingParams(top_k=-1).top_k == -1  # <= 0: off
    for stop in ({"a": 1}, 5, ["a", 1]):
        with pytest.raises(RequestError) as refused:
            sampling({"stop": stop})
        assert refused.value.status == 400 and refused.value.param == "stop"
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        mllama.SamplingParams().with_overrides(stop=5)


def test_base64_images_in_lines_as_ollama_reads_them(app):
    flat = base64.b64encode(png_bytes()).decode()
    wrapped = base64.encodebytes(png_bytes()).decode()  # 76-character lines, as Go's decoder accepts them
    replies = [app.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi", "images": [image]}],
                                           "stream": False, "options": {"num_predict": 1, "temperature": 0}})
               for image in (flat, wrapped)]
    assert [r.status_code for r in replies] == [200, 200], replies[1].text
    assert replies[0].json()["prompt_eval_count"] == replies[1].json()["prompt_eval_count"]


def test_a_last_assistant_message_is_continued(app, model):
    """Ollama's template leaves a last assistant message open (clients' "continue"); vLLM's
    continue_final_message does the same on the OpenAI route."""
    partial = [*HI, {"role": "assistant", "content": "Hel"}]
    tokens, _ = model.chat_prompt(partial, continue_final=True)
    assert tokens == model.chat_prompt(HI)[0] + model.tokenize("Hel")
    ollama = app.post("/api/chat", json={"messages": partial, "stream": False,
                                         "options": {"num_predict": 1, "temperature": 0}})
    assert ollama.status_code == 200 and ollama.json()["prompt_eval_count"] == len(tokens), ollama.text
    openai = app.post("/v1/chat/completions", json={"messages": partial, "max_tokens": 1, "temperature": 0,
                                                    "continue_final_message": True})
    assert openai.status_code == 200 and openai.json()["usage"]["prompt_tokens"] == len(tokens), openai.text
    closed = app.post("/v1/chat/completions", json={"messages": partial, "max_tokens": 1, "temperature": 0})
    assert closed.json()["usage"]["prompt_tokens"] > len(tokens)  # OpenAI's default: a new assistant turn
    refused = app.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1, "continue_final_message": True})
    assert refused.status_code == 400 and "only a last assistant message" in refused.json()["error"]["message"]


def test_error_codes_say_which_limit(app, model):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": url}}
    many = [{"role": "user", "content": [part] * (model.n_image_slots + 1) + [{"type": "text", "text": "Hi"}]}]
    slots = app.post("/v1/chat/completions", json={"messages": many, "max_tokens": 1})
    error = slots.json()["error"]
    assert slots.status_code == 400 and "image slots" in error["message"] and error["code"] is None  # not tokens
    long = app.post("/v1/completions", json={"prompt": "word " * 600, "max_tokens": 1}).json()["error"]
    assert (long["code"], long["param"]) == ("context_length_exceeded", "prompt")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    choice = app.post("/v1/chat/completions", json={"messages": HI, "tools": [tool],
                                                    "tool_choice": {"type": "function", "function": "f"}})
    assert choice.status_code == 400 and "tool_choice" in choice.json()["error"]["message"]
    assert idle(model)
    failed = [line for line in app.get("/metrics").text.splitlines() if line.startswith("mllama_choices_failed_total")]
    assert len(failed) == 1 and float(failed[0].split()[-1]) >= 2  # the two refused at admission, at least


def test_python_api_bad_input_is_named(model, tmp_path):
    for bad in ([999_999_999], [-1], [1.5]):
        with pytest.raises(ValueError, match="is not a token id"):
            model.detokenize(bad)
    with pytest.raises(TypeError, match="text must be a str"):
        model.tokenize(None)
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        model.chat([])
    with pytest.raises(ValueError, match="a text part's text must be a string"):
        model.chat([{"role": "user", "content": [{"type": "text", "text": 5}]}])
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        model.chat(HI, stop=5)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes())
    with open(path) as text_mode, pytest.raises(mllama.ImageError, match="binary mode"):
        model.describe(text_mode)
    with pytest.raises(mllama.ModelLoadError, match="no model path given"):
        mllama.Model("")
    session = model.chat_session()
    for one_reply in (lambda: session.send("Hi", n=2), lambda: model.stream_text([1, 2], n=2),
                      lambda: model.generate("Hi", n=2)):  # (each kept one of two choices and ran the other)
        with pytest.raises(TypeError, match="gives one reply"):
            one_reply()
    assert session.messages == [] and idle(model)


def test_streamed_choices_carry_their_usage_on_the_last_chunk(model):
    chunks = list(model.chat(HI, stream=True, n=2, max_tokens=3, temperature=0))
    usages = [c["usage"] for c in chunks if c.get("usage")]
    whole = model.chat(HI, n=2, max_tokens=3, temperature=0)
    assert usages == [whole["usage"]] and chunks[-1].get("usage") == whole["usage"]  # (n > 1 had none)


def test_encode_image_by_default_takes_a_slot_no_generation_reads(model):
    stream = model.chat([{"role": "user", "content": [{"type": "image", "image": png_bytes(5)},
                                                      {"type": "text", "text": "Hi"}]}],
                        stream=True, temperature=0, max_tokens=50)
    for _ in stream:  # admitted (after its first chunks): its image's slot is read until it ends
        if any(model.engine.slot_refs):
            break
    busy = [slot for slot, refs in enumerate(model.engine.slot_refs) if refs]
    assert len(busy) == 1
    model._next_slot = busy[0]  # the turn falls on the busy slot
    out = model.encode_image(png_bytes(6))
    assert np.isfinite(out).all() and model.engine.slot_refs[busy[0]] == 1
    stream.close()
    model.run_step()
    assert idle(model)


def test_the_metrics_window_stays_bounded_without_scrapes(model):
    """One entry a step, dropped once older than the window whether /metrics is read or not (a server nobody
    scrapes must not grow); read while the driver thread appends, under one lock."""
    from mllama.server.metrics import Metrics

    metrics = Metrics(model, window_s=0.05)
    for _ in range(2000):
        metrics.stepped(model.scheduler)
    time.sleep(0.1)
    metrics.stepped(model.scheduler)
    assert len(metrics._recent) == 1
    assert b"mllama_generated_tokens_per_second" in metrics.render()[0]


def test_a_prompt_longer_than_the_context_by_its_length_is_refused_untokenized(app, model, monkeypatch):
    tokenizer = model.tokenizer
    longest, encode = [0], tokenizer.encode
    bound = model.n_ctx * tokenizer.max_token_bytes  # characters: more than this can never fit

    def watched(text, **kwargs):
        longest[0] = max(longest[0], len(text))
        return encode(text, **kwargs)
    monkeypatch.setattr(tokenizer, "encode", watched)
    big = "word " * (bound // 5 + 10)  # (a 30 MiB prompt took a minute to tokenize before its 400)
    old_big = [{"role": "user", "content": big}, {"role": "assistant", "content": "Yes"}, *HI]
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
                       ("/v1/completions", {"prompt": big}), ("/api/generate", {"prompt": big, "stream": False}),
                       ("/api/generate", {"prompt": big, "raw": True, "stream": False}),
                       ("/api/chat", {"messages": [*HI, {"role": "assistant", "content": "Yes"},
                                                   {"role": "user", "content": big}], "stream": False})):
        reply = app.post(path, json={**body, "max_tokens": 1, "options": {"num_predict": 1}})
        assert reply.status_code == 400 and "(by its length)" in reply.text, (path, reply.text)
    with pytest.raises(mllama.ContextOverflowError, match="by its length"):
        model.generate(big, stream=False)
    for truncate in (False, True):
        with pytest.raises(mllama.ContextOverflowError, match="by its length"):
            model.chat([{"role": "user", "content": big}], truncate=truncate)
    fitted = app.post("/api/chat", json={"messages": old_big, "stream": False, "options": {"num_predict": 1}})
    assert fitted.status_code == 200, fitted.text
    assert model.chat(old_big, truncate=True, max_tokens=1)["choices"]
    assert longest[0] < bound and idle(model)


def test_the_length_bound_never_exceeds_the_tokens(model):
    tokenizer = model.tokenizer
    assert tokenizer.max_token_bytes == 128 and len(tokenizer.encode(" " * 128)) == 1  # Llama 3's longest token
    for text in (" " * 128, " " * 4096, "-" * 1000, "é" * 500, "🙂" * 300, "\ud800x", "<|eot_id|>" * 50,
                 "//" + "-" * 112, "word " * 100, ""):
        for special in (False, True):
            assert tokenizer.at_least([text]) <= len(tokenizer.encode(text, allow_special=special))
