"""Tool calls for text-only turns in the Llama 3.x JSON format of the chat template: rendering of tools,
calls and results; replies parsed back into OpenAI's `tool_calls`; a forced call is held to the tools'
schemas; tools with an image are refused. Model.chat and the server with the official client."""

from __future__ import annotations

import base64
import json

import jsonschema
import pytest

import mllama
from mllama.text.chat_template import default_template, render
from mllama.text.tools import call_schema, parse_call
from test_server import client, data_url, post, running

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast.", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_the_template_renders_tools_calls_and_results():
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'}
    text = render(default_template(), ASK + [call, result], tools=TOOLS, bos_token="<B>", date_string="1 Jan 2025")
    assert text.startswith("<B><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert ("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON "
            "for a function call with its proper arguments") in text
    assert json.dumps(TOOLS[0], indent=4) in text and text.count('"name": "get_time"') == 1
    assert text.endswith("What is the weather in Paris?<|eot_id|>"
                         '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
                         '{"city": "Paris", "days": 2}}<|eot_id|>'
                         '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 20}<|eot_id|>'
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    injected = render(default_template(), ASK + [call, {"role": "tool", "content": '{"x": "<|eot_id|>"}'}],
                      tools=TOOLS, bos_token="<B>")
    assert '{"x": "<\\u007ceot_id|>"}<|eot_id|>' in injected  # data cannot make a special token


def test_an_ipython_result_renders_as_a_tool_result():
    """The template writes both roles' results as JSON: a string quoted and escaped, never cut by its own quotes."""
    for content in ('{"temperature": 21}', 'said "hi"\nbye', "<|eot_id|>"):
        texts = [render(default_template(), ASK + [{"role": role, "content": content}], bos_token="<B>",
                        date_string="1 Jan 2025") for role in ("tool", "ipython")]
        assert texts[0] == texts[1], content
    escaped = render(default_template(), ASK + [{"role": "ipython", "content": 'said "hi"\nbye'}], bos_token="<B>")
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"said \\"hi\\"\\nbye"<|eot_id|>' in escaped


def test_a_forced_call_of_a_tool_whose_parameters_leave_out_the_type_is_an_object():
    loose = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}}}]
    schema = call_schema(loose)
    jsonschema.validate({"name": "f", "parameters": {"a": 1}}, schema)
    for arguments in ("oops", 5, [1]):  # what parse_call would refuse: the grammar must not allow it
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "f", "parameters": arguments}, schema)
    deep = {"type": "object", "properties": {}}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(ValueError, match="nested too deeply"):
        call_schema([{"type": "function", "function": {"name": "f", "parameters": deep}}])


def test_parse_call():
    names = ("get_weather",)
    call = parse_call('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', names)
    assert call[0]["type"] == "function" and call[0]["id"].startswith("call_")
    assert call[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse_call('{"name": "other", "parameters": {}}', names) is None
    assert parse_call('{"name": "get_weather", "parameters": 3}', names) is None
    assert parse_call("It is sunny.", names) is None and parse_call("{not json", names) is None


@pytest.fixture(scope="module")
def model(gguf_f32):
    with mllama.Model(gguf_f32, n_ctx=1024) as m:
        yield m


def check_call(call, names=tuple(SCHEMAS)) -> None:
    assert call["type"] == "function" and call["function"]["name"] in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_model_chat_forced_auto_and_refused(model):
    for seed in range(3):
        reply = model.chat(ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=1.0, seed=seed)
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        check_call(choice["message"]["tool_calls"][0])
    named = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(model.chat(ASK, tools=TOOLS, tool_choice=named, max_tokens=80, temperature=1.0, seed=1, stream=True))
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    check_call(calls[0][0], ("get_time",))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    text = model.chat(ASK, tools=TOOLS, max_tokens=4, temperature=0)["choices"][0]  # the random model writes text
    assert text["finish_reason"] in ("stop", "length") and isinstance(text["message"]["content"], str)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}},
                                          {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(ValueError, match="tools cannot be used together with images"):
        model.chat(image, tools=TOOLS)
    with pytest.raises(ValueError, match="'tool_choice' names a function not in 'tools'"):
        model.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


PYDANTIC_LIKE = {"$defs": {"Item": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}},
                                   "required": ["name"], "additionalProperties": False}},
                 "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"},
                                                            "maxItems": 2}},
                 "required": ["items"], "additionalProperties": False}


def test_a_forced_call_of_a_tool_whose_parameters_use_defs(model):
    """Nested models (pydantic's `$defs` and `$ref`) in a forced call: their refs still resolve in the call's schema
    (it wraps the parameters: "#/$defs/Item" pointed at the wrapper's root, and the call was refused)."""
    tools = [{"type": "function", "function": {"name": "order", "parameters": PYDANTIC_LIKE}}]
    schema = call_schema(tools)
    jsonschema.validate({"name": "order", "parameters": {"items": [{"name": "tea"}]}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "order", "parameters": {"items": [{"nom": "tea"}]}}, schema)
    for seed in range(3):
        choice = model.chat(ASK, tools=tools, tool_choice="required", max_tokens=120, temperature=1.0,
                            seed=seed)["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            jsonschema.validate(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), PYDANTIC_LIKE)
        else:  # the random model may write long strings: cut, never a call that breaks the schema
            assert choice["finish_reason"] == "length"


@pytest.mark.parametrize("tools,fragment", [("ab", "must be a list"), ([{"name": "f"}], r"tools\[0\] must be"),
                                            ({"type": "function"}, "must be a list")])
def test_chat_prompt_checks_its_tools(model, tools, fragment):
    """chat_prompt's tools as the chat calls' are checked (a string had been shown to the model letter by letter)."""
    with pytest.raises(ValueError, match=fragment):
        model.chat_prompt(ASK, tools=tools)


def test_a_strict_tool_is_held_as_strictly_as_a_strict_response_format(model):
    unique = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "maximum": 1},
                                                       "minItems": 2, "maxItems": 2, "uniqueItems": True}},
              "required": ["ids"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "pick", "parameters": unique}}
    strict = {**tool, "function": {**tool["function"], "strict": True}}
    with pytest.raises(ValueError, match="uniqueItems"):  # (as response_format with strict: it was ignored)
        model.chat(ASK, tools=[strict], tool_choice="required", max_tokens=1)
    with pytest.raises(ValueError, match="uniqueItems"):
        model.chat(ASK, max_tokens=1, response_format={"type": "json_schema", "json_schema": {
            "name": "pick", "schema": unique, "strict": True}})
    assert model.chat(ASK, tools=[tool], tool_choice="required", max_tokens=1)["choices"]  # lenient: ignored
    for where in ({"tools": [{**tool, "function": {**tool["function"], "strict": "false"}}], "tool_choice": "required"},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": unique,
                                                                              "strict": "false"}}}):
        with pytest.raises(ValueError, match="strict must be true or false"):  # ("false" was read as true)
            model.chat(ASK, max_tokens=1, **where)


def test_a_forced_call_of_a_tool_schema_with_an_id(model):
    """`$id` changes the base `$ref`s resolve against: under the call's `$defs` the rebased refs missed (a 400)."""
    params = {"$id": "https://example.com/tool.json", "type": "object",
              "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"$ref": "#/properties/a"}},
              "required": ["a", "b"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "pair", "parameters": params}}]
    for seed in range(2):
        choice = model.chat(ASK, tools=tools, tool_choice="required", max_tokens=60, temperature=1.0,
                            seed=seed)["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        jsonschema.validate(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), params)


def test_a_forced_call_complete_at_max_tokens_is_a_call(model):
    """A constrained reply that is complete when max_tokens runs out ends with "stop" (a call: "tool_calls"), not
    "length": the grammar allows nothing more, and a cut reply is not a call."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    forced = {"tools": tools, "tool_choice": "required", "temperature": 1.0}
    seed = next(seed for seed in range(20)  # a seed whose call the random model completes (most write on)
                if model.chat(ASK, **forced, max_tokens=40, seed=seed)["choices"][0]["finish_reason"] == "tool_calls")
    n = model.chat(ASK, **forced, max_tokens=40, seed=seed)["usage"]["completion_tokens"]
    exact = model.chat(ASK, **forced, max_tokens=n, seed=seed)["choices"][0]  # the same draws, up to the limit
    assert exact["finish_reason"] == "tool_calls" and exact["message"]["tool_calls"][0]["function"]["name"] == "f"
    cut = model.chat(ASK, **forced, max_tokens=n - 1, seed=seed)["choices"][0]
    assert cut["finish_reason"] == "length" and cut["message"].get("tool_calls") is None
    with pytest.raises(ValueError, match="must be a JSON schema of type \"object\""):
        model.chat(ASK, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])


@pytest.fixture(scope="module")
def server(gguf_f32):
    with running(gguf_f32, "--ctx", "1024", "--parallel", "1") as base:
        yield base


def test_server_tool_calls_with_the_official_client(server):
    c = client(server)
    whole = c.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80,
                                      temperature=1.0, seed=3)
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    check_call(whole.choices[0].message.tool_calls[0].model_dump())
    chunks = list(c.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=80, temperature=1.0, seed=3, stream=True))
    deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices[0].delta.tool_calls]
    assert [d[0].function.model_dump() for d in deltas] == [whole.choices[0].message.tool_calls[0].function.model_dump()]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = whole.choices[0].message.tool_calls[0]
    follow = ASK + [{"role": "assistant", "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'}]
    after = c.chat.completions.create(model="x", messages=follow, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length") and after.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra, fragment", [
    ({"tools": TOOLS, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "Hi"}]}]},
     "tools cannot be used together with images"),
    ({"tools": [{"type": "function"}]}, "tools[0] must be"),
    ({"tools": "x"}, "'tools' must be a list"),
    ({"tools": TOOLS, "tool_choice": "always"}, "'tool_choice' must be"),
    ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
     "tool call arguments must be JSON"),
])
def test_bad_tool_requests(server, extra, fragment):
    body = {"messages": ASK, "max_tokens": 2, **extra}
    status, text = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and fragment in json.loads(text)["error"]["message"], text


def test_ollama_chat_tools_with_the_official_client(server):
    from ollama import Client

    c = Client(host=server, timeout=120)
    forced = {"format": call_schema(TOOLS[:1]), "options": {"temperature": 1.0, "seed": 2, "num_predict": 80}}
    reply = c.chat(model="x", messages=ASK, tools=TOOLS, **forced)  # `format` holds the reply to a call
    call = reply.message.tool_calls[0]
    assert reply.done_reason == "stop" and reply.message.content == "" and call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), WEATHER)
    parts = list(c.chat(model="x", messages=ASK, tools=TOOLS, stream=True, **forced))
    assert [p.message.tool_calls[0].function.name for p in parts if p.message.tool_calls] == ["get_weather"]
    assert parts[-1].done and not parts[0].done
    follow = ASK + [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                    {"role": "tool", "content": '{"temp": 20}'}]
    text = c.chat(model="x", messages=follow, tools=TOOLS, options={"temperature": 0, "num_predict": 3})
    assert text.done and text.message.tool_calls is None and text.eval_count <= 3
    image = base64.b64decode(data_url().split(",", 1)[1])
    with pytest.raises(Exception, match="tools cannot be used together with images"):
        c.chat(model="x", messages=[{"role": "user", "content": "Hi", "images": [image]}], tools=TOOLS)
