"""A conversation longer than the context (generation/context_fit.py): its oldest messages are left out of the
prompt, never the system messages or the last one; the prompt is exactly the template's rendering of what is
kept; a growing conversation keeps its prompt prefix between cuts (the engine's prefix reuse); images beyond the
image slots go with their messages; Chat sessions and Ollama's /api/chat (`truncate`, default true) use it, the
OpenAI API does not."""

from __future__ import annotations

import pytest
from PIL import Image

import mllama
from mllama._native.errors import ContextOverflowError
from mllama.generation.context_fit import fit_chat, reply_room

N_CTX = 256
SYSTEM = {"role": "system", "content": "You answer in one word."}


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=N_CTX, n_image_slots=2) as m:
        yield m


def question(t: int) -> dict:
    return {"role": "user", "content": f"Question {t}: what follows {t} in the sequence of numbers?"}


def history(n_turns: int) -> list[dict]:
    """n_turns questions and answers, then the next question: history(t + 1) goes on from history(t)."""
    messages = [SYSTEM]
    for t in range(n_turns):
        messages += [question(t), {"role": "assistant", "content": f"The number {t + 1} follows {t}."}]
    return messages + [question(n_turns)]


def kept_messages(messages: list[dict], n_left_out: int) -> list[dict]:
    rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
    first = rest[n_left_out]
    return [m for i, m in enumerate(messages) if i >= first or m["role"] == "system"]


def test_a_conversation_that_fits_is_left_as_it_is(model):
    messages = history(2)
    fitted = fit_chat(model, messages)
    assert (fitted.tokens, fitted.images, fitted.n_left_out) == (*model.chat_prompt(messages), 0)


@pytest.mark.parametrize("max_tokens", [None, 10])
def test_the_oldest_messages_go_and_the_prompt_is_what_is_kept(model, max_tokens):
    messages = history(20)
    assert len(model.chat_prompt(messages)[0]) > N_CTX
    fitted = fit_chat(model, messages, max_tokens=max_tokens)
    kept = kept_messages(messages, fitted.n_left_out)
    assert fitted.n_left_out > 0 and fitted.n_left_out % 2 == 0  # whole turns: the prompt starts at a user turn
    assert kept[0] == SYSTEM and kept[1]["role"] == "user" and kept[-1] == messages[-1]
    assert fitted.tokens == model.chat_prompt(kept)[0]
    assert len(fitted.tokens) <= N_CTX - reply_room(N_CTX, max_tokens)
    assert reply_room(N_CTX, max_tokens) == (10 if max_tokens else N_CTX // 4)


def test_a_growing_conversation_keeps_its_prompt_prefix_between_cuts(model):
    prompts = [fit_chat(model, history(t)) for t in range(8, 40)]
    cuts = [p.n_left_out for p in prompts]
    assert cuts == sorted(cuts) and cuts[0] < cuts[-1]
    changes = sum(a != b for a, b in zip(cuts, cuts[1:]))
    assert changes <= len(cuts) // 3  # half a context (128 tokens) goes at a cut: several turns in between
    for before, after in zip(prompts, prompts[1:]):
        if before.n_left_out == after.n_left_out:  # the previous prompt (up to its reply) is this one's prefix
            assert after.tokens[:len(before.tokens)] == before.tokens


def test_images_beyond_the_slots_go_with_their_messages(model):
    images = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    messages = []
    for t, image in enumerate(images):
        messages += [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
                     {"role": "assistant", "content": f"Color {t}."}]
    messages.append({"role": "user", "content": "Which was last?"})
    fitted = fit_chat(model, messages)
    assert fitted.n_left_out == 2 and fitted.images == images[1:]
    with pytest.raises(ContextOverflowError, match="image slots"):
        model.chat(messages, max_tokens=1)
    reply = model.chat(messages, max_tokens=1, temperature=0, truncate=True)
    assert reply["usage"]["prompt_tokens"] == len(fitted.tokens)


def test_a_last_message_too_long_alone_gets_the_engines_error(model):
    messages = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "word " * 400}]
    fitted = fit_chat(model, messages)
    assert fitted.n_left_out == 2 and len(fitted.tokens) > N_CTX
    with pytest.raises(ContextOverflowError, match="the context holds"):
        model.chat(messages, truncate=True)


def test_a_chat_session_outgrows_the_context_without_losing_its_history(model):
    chat = model.chat_session(system="Be brief.", temperature=0.0, max_tokens=4)
    for t in range(30):
        chat.send(f"Tell me about the number {t}, and then about the one after it.")
    assert len(chat.messages) == 61 and chat.n_left_out > 0
    assert chat.messages[0]["role"] == "system"
    strict = model.chat_session(truncate=False, temperature=0.0, max_tokens=4)
    with pytest.raises(ContextOverflowError):
        for t in range(30):
            strict.send(f"Tell me about the number {t}, and then about the one after it.")
    chat.clear()
    assert chat.n_left_out == 0 and len(chat.messages) == 1


def test_ollama_chat_truncates_unless_told_not_to(model):
    from fastapi.testclient import TestClient

    from mllama.server.app import create_app

    messages = history(20)
    body = {"messages": messages, "stream": False, "options": {"temperature": 0, "num_predict": 3}}
    expected = fit_chat(model, messages, max_tokens=3)
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        reply = client.post("/api/chat", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["prompt_eval_count"] == len(expected.tokens)
        strict = client.post("/api/chat", json={**body, "truncate": False})
        assert strict.status_code == 400 and "the context holds" in strict.json()["error"]
        bad = client.post("/api/chat", json={**body, "truncate": "yes"})
        assert bad.status_code == 400 and bad.json()["error"] == "'truncate' must be true or false"
        openai = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3})
        assert openai.status_code == 400 and openai.json()["error"]["code"] == "context_length_exceeded"
