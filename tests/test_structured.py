"""Structured output (constrained decoding with llguidance) through the Python API. The tiny model has
random weights: at temperature 1 nothing but the grammar's mask makes its answers valid JSON, so
"every sampled answer validates against its schema" tests the constraint itself."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import mllama
from mllama.generation.constrain import Grammar, GrammarVocabulary


def obj(properties: dict) -> dict:
    """A closed object schema: every property required, nothing else."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


# bounded so that a random model finishes them: strings by length, pattern or enum, numbers by multipleOf
SCHEMAS = {
    "nested": obj({"person": obj({"name": {"type": "string", "maxLength": 8},
                                  "address": obj({"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
    "array": obj({"items": {"type": "array", "minItems": 1, "maxItems": 3,
                            "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                          "ok": {"type": "boolean"}})}}),
    "enum_numbers": obj({"color": {"enum": ["red", "green", "blue"]},
                         "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
                         "count": {"type": "integer", "minimum": 0, "maximum": 10}}),
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                    "when": {"type": "string", "format": "date"}}),
}
SEEDS = (0, 1, 2)
ASK = [{"role": "user", "content": "Answer in JSON."}]


def schema_format(name: str, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": strict}}


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=1024) as m:
        yield m


def answer(model, messages=ASK, **kwargs) -> tuple[str, str]:
    choice = model.chat(messages, **{"temperature": 1.0, "max_tokens": 80, **kwargs})["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sampled_answer_validates(model, name):
    texts = set()
    for seed in SEEDS:
        text, finish = answer(model, response_format=schema_format(name), seed=seed)
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        texts.add(text)
    assert len(texts) > 1  # sampled, not one fixed answer


def test_unconstrained_answers_are_not_json(model):
    """The control: the same model and seeds without the constraint give no valid JSON."""
    for seed in SEEDS:
        text, _ = answer(model, seed=seed, max_tokens=20)
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_streamed_chunks_equal_the_whole_answer_and_greedy_respects_the_mask(model):
    whole, _ = answer(model, response_format=schema_format("nested"), seed=5)
    chunks = model.chat(ASK, stream=True, response_format=schema_format("nested"), temperature=1.0, max_tokens=80,
                        seed=5)
    chunks = list(chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    greedy, finish = answer(model, response_format=schema_format("array"), temperature=0.0)
    assert finish == "stop"
    jsonschema.validate(json.loads(greedy), SCHEMAS["array"])


def test_json_object_mode(model):
    first = np.flatnonzero(model.compile_grammar(response_format={"type": "json_object"}).start().allowed_tokens())
    assert sorted(model.detokenize([int(t)]) for t in first) == ["{", '{"', "{}"]
    for seed in range(4):
        text, finish = answer(model, response_format={"type": "json_object"}, seed=seed, max_tokens=24)
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # an open string of random tokens runs into max_tokens
            assert finish == "length" and text.startswith("{")


def test_complete_grammar_allows_only_end_of_generation(model):
    state = model.compile_grammar(response_format=schema_format("enum_numbers")).start()
    mask = state.allowed_tokens()
    assert mask.shape == (model.hparams.n_vocab,) and mask.dtype == bool and 0 < mask.sum() < 10
    assert not mask[sorted(model.eog_ids)].any()
    for token in model.tokenize('{"color": "blue", "score": -0.25, "count": 10}'):
        assert state.allowed_tokens()[token]
        state.advance(token)
    assert state.done and state.is_accepting()
    assert sorted(np.flatnonzero(state.allowed_tokens())) == sorted(model.eog_ids)


def test_a_tiny_max_tokens_ends_with_length(model):
    reply = model.chat(ASK, response_format=schema_format("nested"), temperature=1.0, seed=0, max_tokens=3)
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["message"]["content"].startswith('{"')


@pytest.fixture(scope="module")
def wide(model) -> GrammarVocabulary:
    """A vocabulary as wide as the tokenizer (128,257: <|image|> included), <|image|> forbidden."""
    return GrammarVocabulary(model.tokenizer, model.eog_ids, model.tokenizer.n_vocab,
                             forbidden=[model.hparams.image_token_id])


def test_image_token_is_never_allowed(model, wide):
    """The logits stop before <|image|> (128256); a vocabulary as wide as the tokenizer masks it out
    even where a grammar names it."""
    assert model.grammar_vocabulary.n_logits == model.hparams.n_vocab <= model.hparams.image_token_id
    mask = Grammar.lark(wide, 'start: <|image|> | "b"').start().allowed_tokens()
    assert mask.shape == (model.tokenizer.n_vocab,) and list(np.flatnonzero(mask)) == model.tokenize("b")
    with pytest.raises(ValueError, match="allows no token"):
        Grammar.lark(wide, "start: <|image|>").start().allowed_tokens()


GREETING = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/'


@pytest.mark.parametrize("grammar,pattern", [
    (GREETING, r"(hello|hi) [A-Z][a-z]{1,5}!"),
    ({"lark": 'start: "yes" | "no"'}, r"yes|no"),
    ({"regex": r"[a-c]{3}-[0-9]{2}"}, r"[a-c]{3}-[0-9]{2}"),
], ids=["lark", "lark_dict", "regex"])
def test_grammar_on_generate(model, grammar, pattern):
    for seed in SEEDS:
        text = model.generate("<|begin_of_text|>Say something:", grammar=grammar, stream=False, temperature=1.0,
                              seed=seed, max_tokens=40)
        assert re.fullmatch(pattern, text), text


def test_grammar_on_generate_tokens(model):
    prompt = model.tokenize("<|begin_of_text|>Say something:", special=True)
    for seed in SEEDS:
        tokens = list(model.generate_tokens(prompt, grammar={"regex": r"[a-c]{3}-[0-9]{2}"}, temperature=1.0,
                                            seed=seed, max_tokens=40))
        assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", model.detokenize(tokens)), tokens
        schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": obj({"n": {"enum": [1, 2, 3]}})}}
        tokens = list(model.generate_tokens(prompt, response_format=schema, temperature=1.0, seed=seed,
                                            max_tokens=40))
        assert json.loads(model.detokenize(tokens))["n"] in (1, 2, 3), tokens
    with pytest.raises(ValueError, match="unclosed group"):
        list(model.generate_tokens(prompt, grammar={"regex": "a(b"}))


def test_a_compiled_grammar_serves_many_calls_and_chat_sessions(model):
    grammar = model.compile_grammar({"regex": r"[0-9]{4}"})
    chat = model.chat_session(grammar=grammar, temperature=1.0, max_tokens=10)
    replies = [chat.send("A year?"), chat.send("Another one?"), answer(model, grammar=grammar, seed=1)[0]]
    assert all(re.fullmatch(r"[0-9]{4}", r) for r in replies), replies


def test_the_same_constraint_is_compiled_once(wide, monkeypatch):
    """A server sees the same schema in request after request: it is compiled (and its first mask checked) once,
    then the Grammar is shared; the least recently used of more than N_COMPILED goes."""
    compiles = []
    real_init = Grammar.__init__
    monkeypatch.setattr(Grammar, "__init__", lambda self, *a: (compiles.append(a[1]), real_init(self, *a))[1])
    monkeypatch.setattr(GrammarVocabulary, "N_COMPILED", 3)
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": obj({"n": {"type": "integer"}})}}
    first = Grammar.from_response_format(wide, schema)
    assert Grammar.from_response_format(wide, json.loads(json.dumps(schema))) is first and len(compiles) == 1
    assert Grammar.from_grammar(wide, {"regex": "[0-9]+"}) is not Grammar.from_grammar(wide, "start: /[0-9]+/")
    assert Grammar.from_grammar(wide, {"regex": "a"}) is Grammar.from_grammar(wide, {"regex": "a"})
    assert len(compiles) == 4  # the schema, two digit constraints (a regex and Lark: two kinds), "a"
    assert Grammar.from_response_format(wide, schema) is not first and len(compiles) == 5  # it had gone
    with pytest.raises(ValueError, match="admits no text"):
        Grammar.from_grammar(wide, "start: <|image|>")
    with pytest.raises(ValueError, match="admits no text"):  # a failure is not kept
        Grammar.from_grammar(wide, "start: <|image|>")
    assert len(compiles) == 7


def test_one_grammar_serves_sequences_in_several_threads(model):
    """A Grammar is shared; each sequence walks its own GrammarState (uniform among the allowed tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    grammar = model.compile_grammar({"regex": r"[a-z]{2,6}( [0-9]{1,3}){1,3}"})

    def walk(seed: int) -> str:
        state, rng, tokens = grammar.start(), np.random.default_rng(seed), []
        while (token := int(rng.choice(np.flatnonzero(state.allowed_tokens())))) not in model.eog_ids:
            state.advance(token)
            tokens.append(token)
        assert state.is_accepting()
        return model.detokenize(tokens)

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(walk, range(12)))
    assert all(re.fullmatch(r"[a-z]{2,6}( [0-9]{1,3}){1,3}", t) for t in texts), texts
    assert len(set(texts)) > 6


@pytest.mark.parametrize("kwargs,fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "invalid JSON schema: Invalid type: strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5,
                                                                            "maximum": 3}}}}, "Unsatisfiable"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True},
                                                                 "strict": True}}}, "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "must be an object"),
    ({"response_format": {"type": "xml"}}, "response_format must be"),
    ({"response_format": "json"}, "response_format must be"),
    ({"grammar": "start: foo"}, 'unknown name: "foo"'),
    ({"grammar": ""}, "non-empty"),
    ({"grammar": {"regex": "a(b"}}, "unclosed group"),
    ({"grammar": {"pcre": "a"}}, "grammar must be"),
    ({"grammar": "start: /a/", "response_format": {"type": "json_object"}}, "not both"),
], ids=["bad_type", "unsatisfiable", "strict_unsupported", "no_schema", "schema_not_object", "unknown_type",
        "format_not_object", "bad_lark", "empty_lark", "bad_regex", "unknown_grammar_kind", "both"])
def test_invalid_constraints_raise_value_error(model, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model.chat(ASK, max_tokens=4, **kwargs)


def test_strict_false_ignores_what_llguidance_cannot_enforce(model):
    loose = {"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": {"enum": [1, 2]},
                                                               "maxItems": 2, "uniqueItems": True}}}
    text, finish = answer(model, response_format=loose, seed=0)
    assert finish == "stop" and set(json.loads(text)) <= {1, 2}
    assert model.compile_grammar(response_format={"type": "text"}) is None


def test_a_grammar_from_another_vocabulary_is_refused(model, wide):
    with pytest.raises(ValueError, match="another model"):
        model.compile_grammar(Grammar.regex(wide, "a"))


# --- the server, through the official openai and ollama clients -----------------------------------
@pytest.fixture(scope="module")
def server(gguf_f32):
    from test_server import start_server

    base, proc = start_server(gguf_f32, "--ctx", "1024")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def openai_text(client, stream: bool, **request) -> tuple[str, str]:
    if not stream:
        choice = client.chat.completions.create(model="x", **request).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = list(client.chat.completions.create(model="x", stream=True, **request))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_client_answers_validate(server, stream):
    from test_server import MESSAGES, client

    c = client(server)
    for name, messages in (("nested", ASK), ("array", MESSAGES), ("pattern", ASK)):  # MESSAGES has an image
        for seed in SEEDS[:2]:
            text, finish = openai_text(c, stream, messages=messages, response_format=schema_format(name),
                                       temperature=1.0, seed=seed, max_tokens=80)
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    text, finish = openai_text(c, stream, messages=ASK, response_format=schema_format("nested"), max_tokens=2)
    assert finish == "length" and text.startswith("{")


def test_openai_client_parses_into_a_pydantic_model(server):
    from typing import Literal

    from pydantic import BaseModel, Field
    from test_server import client

    class Reading(BaseModel):
        label: Literal["cat", "dog", "bird"]
        count: int = Field(ge=0, le=20)

    completions = client(server).chat.completions
    parse = getattr(completions, "parse", None) or client(server).beta.chat.completions.parse
    for seed in SEEDS:
        reply = parse(model="x", messages=ASK, response_format=Reading, temperature=1.0, seed=seed, max_tokens=40)
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Reading) and 0 <= parsed.count <= 20


@pytest.mark.parametrize("response_format,fragment", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}, "strict": True}},
     "invalid JSON schema: Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[a-"}}},
     "unclosed character class"),
    ({"type": "yaml"}, "response_format must be"),
    ("json", "'response_format' must be an object"),
], ids=["bad_type", "bad_pattern", "unknown_type", "not_object"])
def test_openai_bad_response_format_is_400(server, response_format, fragment):
    from test_server import post

    body = {"messages": ASK, "response_format": response_format, "max_tokens": 4}
    status, text = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and fragment in json.loads(text)["error"]["message"], text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ollama_client_format(server, stream):
    from test_server import ollama_client

    def text_of(reply, key):
        parts = list(reply) if stream else [reply]
        assert parts[-1].done and parts[-1].done_reason == "stop"
        return "".join(getattr(p, key).content if key == "message" else p.response for p in parts)

    c = ollama_client(server)
    for seed in SEEDS[:2]:
        options = {"temperature": 1.0, "seed": seed, "num_predict": 80}
        for name in ("enum_numbers", "nested"):
            reply = c.chat(model="x", messages=ASK, format=SCHEMAS[name], options=options, stream=stream)
            jsonschema.validate(json.loads(text_of(reply, "message")), SCHEMAS[name])
        reply = c.generate(model="x", prompt="Answer in JSON.", format=SCHEMAS["array"], options=options, stream=stream)
        jsonschema.validate(json.loads(text_of(reply, "response")), SCHEMAS["array"])


def test_ollama_json_and_bad_formats(server):
    from test_server import ollama_client, post

    whole = ollama_client(server).generate(model="x", prompt="Hi", format="json", options={"num_predict": 2})
    assert whole.response.startswith("{")  # two tokens may close the object ("{" "}"), or run out first
    if whole.done_reason == "stop":
        assert isinstance(json.loads(whole.response), dict)
    else:
        assert whole.done_reason == "length"
    for body, fragment in [({"format": "xml"}, "'format' must be"), ({"format": 3}, "'format' must be"),
                           ({"format": {"type": "object", "properties": {"a": {"type": 7}}}}, "invalid JSON schema")]:
        status, text = post(server, "/api/generate", json.dumps({"prompt": "Hi", **body}).encode())
        assert status == 400 and fragment in json.loads(text)["error"], (body, text)  # Ollama's shape


def test_a_schema_past_llguidances_limits_is_the_requests_error(model):
    """A schema that compiles but that llguidance cannot follow (its item limit) fails as the request's error, a
    ValueError (HTTP 400), not as a token that "does not fit" (an internal error, 500); True is any JSON value."""
    recursive = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
                 "$ref": "#/$defs/n"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": recursive}}
    with pytest.raises(ValueError, match="constrained decoding failed"):
        model.chat([{"role": "user", "content": "Hi"}], response_format=fmt, max_tokens=5)
    anything = {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}
    assert model.compile_grammar(response_format=anything) is not None
