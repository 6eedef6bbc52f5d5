"""A conversation longer than the context (generation/context_fit.py): its oldest messages are left out of the
prompt, never the system messages or the last one; the prompt is exactly the template's rendering of what is
kept; a growing conversation keeps its prompt prefix between cuts (the engine's prefix reuse); images beyond the
image slots go with their messages; Chat sessions and Ollama's /api/chat (`truncate`, default true) use it, the
OpenAI API does not."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import mllama
from mllama._native.errors import ContextOverflowError
from mllama.generation.context_fit import _Fitting, fit_chat, reply_room

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
    """Up to the last turn that fits whole (past half the room, where the grid of cuts begins): nothing left out."""
    budget, longest = N_CTX - reply_room(N_CTX, None), 0
    for t in range(2, 40):
        messages = history(t)
        whole = model.chat_prompt(messages)
        if len(whole[0]) > budget:
            break
        fitted = fit_chat(model, messages)
        assert (fitted.tokens, fitted.images, fitted.n_left_out) == (*whole, 0), t
        longest = len(whole[0])
    assert longest > budget * 3 // 4


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
    # the cut moves by half the room the system prompt leaves (its grid), not by one turn each turn
    fitting = _Fitting(model, history(40), {"tools": None}, N_CTX - reply_room(N_CTX, None))
    growth = fitting.before[2 * 40] - fitting.before[2 * 8]
    assert sum(a != b for a, b in zip(cuts, cuts[1:])) <= growth // fitting.quantum + 1 < len(cuts) // 2
    for before, after in zip(prompts, prompts[1:]):
        assert len(after.tokens) > (N_CTX - reply_room(N_CTX, None)) // 2  # most of the room is used
        if before.n_left_out == after.n_left_out:  # the previous prompt (up to its reply) is this one's prefix
            assert after.tokens[:len(before.tokens)] == before.tokens


def test_images_beyond_the_slots_go_with_their_messages(model):
    images = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    messages = []
    for t, image in enumerate(images):
        content = [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]
        messages += [{"role": "user", "content": content},
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


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def tool_loop(n_calls: int) -> list[dict]:
    messages = [SYSTEM, {"role": "user", "content": "What is the weather in Paris, London, Rome and Berlin?"}]
    for i in range(n_calls):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": f"City{i}"})}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temp": 20 + i, "sky": "clear"})}]
    return messages


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_a_tool_loop_keeps_its_question_and_whole_calls(model, tools):
    messages = tool_loop(8)
    fitted = fit_chat(model, messages, tools=tools)
    tail = len(messages) - fitted.n_left_out - 2  # kept after the system prompt and the question
    kept = messages[:2] + messages[len(messages) - tail:]
    assert fitted.n_left_out >= 2 and len(kept) >= 4  # the question, then at least one whole call and result
    assert kept[:2] == messages[:2] and kept[2]["role"] == "assistant" and "tool_calls" in kept[2]
    assert fitted.tokens == model.chat_prompt(kept, tools=tools)[0]
    shortest = model.chat_prompt(messages[:2] + messages[-2:], tools=tools)[0]  # the question, the last call
    if len(shortest) <= N_CTX - reply_room(N_CTX, None):
        assert len(fitted.tokens) <= N_CTX - reply_room(N_CTX, None)
    else:  # nothing fits the room (the tool list is long): the shortest prompt, for the engine to run or refuse
        assert fitted.tokens == shortest


def test_a_long_system_prompt_still_keeps_the_recent_exchange(model):
    system = {"role": "system", "content": "You are a careful assistant who answers precisely. " * 12}
    budget = N_CTX - reply_room(N_CTX, 16)
    for n_turns in range(3, 12):
        messages = [system, *history(n_turns)[1:]]
        fitted = fit_chat(model, messages, max_tokens=16)
        recent = [system, *messages[-3:]]  # the last question and answer, and the new question
        if len(model.chat_prompt(recent)[0]) <= budget:
            assert len(messages) - fitted.n_left_out >= len(recent)
        assert len(fitted.tokens) <= budget


def test_a_system_message_in_the_middle_never_breaks_an_image_conversation(model):
    image = {"type": "image", "image": Image.new("RGB", (40, 30), (200, 10, 10))}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A red picture."},
                {"role": "system", "content": "Answer in French."}, *history(12)[1:-1],
                {"role": "user", "content": [image, {"type": "text", "text": "And this one?"}]}]
    model.chat_prompt(messages)  # renders whole
    fitted = fit_chat(model, messages, max_tokens=1)
    assert fitted.n_left_out > 3 and len(fitted.images) == 1
    assert model.chat(messages, truncate=True, max_tokens=1)["usage"]["prompt_tokens"] == len(fitted.tokens)


def test_a_very_long_history_is_not_rendered_whole(model, monkeypatch):
    messages = history(3000)
    rendered = []
    chat_prompt = type(model).chat_prompt

    def counting(self, kept, **kwargs):
        rendered.append(len(kept))
        return chat_prompt(self, kept, **kwargs)

    monkeypatch.setattr(type(model), "chat_prompt", counting)
    fitted = fit_chat(model, messages)
    assert len(fitted.tokens) <= N_CTX - reply_room(N_CTX, None)
    assert len(rendered) <= 4 and max(rendered) < 20  # a few renders of what may fit, none of the whole


def test_a_failed_or_unread_turn_leaves_the_chat_as_it_was(model):
    chat = model.chat_session(temperature=0.0, max_tokens=4)
    for t in range(8):
        chat.send(f"Tell me about the number {t}, and then about the one after it.")
    messages, n_left_out = list(chat.messages), chat.n_left_out
    with pytest.raises(ContextOverflowError):
        chat.send("word " * 400)
    assert chat.messages == messages and chat.n_left_out == n_left_out
    chat.send("Never read.", stream=True).close()  # a turn whose reply was never read did not happen
    chat.send("Next question?", stream=True)
    assert [m["role"] for m in chat.messages[len(messages):]] == ["user"]
    assert chat.messages[-1]["content"][-1]["text"] == "Next question?"


def said(chat) -> list[tuple[str, str]]:
    return [(m["role"], m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"])
            for m in chat.messages]


def test_a_send_ends_the_streamed_turn_before_it(model):
    """Unread, the turn before leaves nothing (its stream yields nothing); read in part, its reply is kept as far
    as it went, before the new turn: the history stays in the order of the turns."""
    alone = model.chat_session(temperature=0.0, max_tokens=4)
    second = alone.send("second")
    chat = model.chat_session(temperature=0.0, max_tokens=4)
    first = chat.send("first", stream=True)
    assert chat.send("second") == second and list(first) == []
    assert said(chat) == [("user", "second"), ("assistant", second)]
    chat = model.chat_session(temperature=0.0, max_tokens=4)
    first = chat.send("first", stream=True)
    piece = next(first)
    chat.send("second")
    assert list(first) == []
    assert [role for role, _ in said(chat)] == ["user", "assistant", "user", "assistant"]
    assert said(chat)[:2] == [("user", "first"), ("assistant", piece)]


def test_chat_many_truncates_when_asked(model):
    long, short = history(20), history(1)
    with pytest.raises(ContextOverflowError):
        model.chat_many([long, short], max_tokens=2)
    replies = model.chat_many([long, short], max_tokens=2, temperature=0.0, truncate=True)
    assert replies[0]["usage"]["prompt_tokens"] == len(fit_chat(model, long, max_tokens=2).tokens)
    assert replies[1]["usage"]["prompt_tokens"] == len(model.chat_prompt(short)[0])
