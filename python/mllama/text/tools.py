"""Tool calls for text-only turns, in the Llama 3.x JSON format the chat template defines: the tools
go into the first user message, the model answers {"name": ..., "parameters": {...}}, earlier calls are
rendered back from `tool_calls` and results from `tool` messages. Llama 3.2 Vision does not support
tools together with images (its model card): that combination is refused."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolSpec:
    """What a request's `tools`/`tool_choice` mean: the tools shown to the model (None: none), the
    names a reply may call, and the JSON schema that forces a call (None: the model may answer in text)."""
    tools: list[dict] | None
    names: tuple[str, ...]
    schema: dict | None


def resolve(tools, tool_choice) -> ToolSpec | None:
    """OpenAI's `tools` and `tool_choice`, checked (ValueError with the reason); None without tools."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError("'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise ValueError("'tools' must be a list")
    names = tuple(function_name(t, i) for i, t in enumerate(tools))
    if len(set(names)) != len(names):
        raise ValueError("the names in 'tools' must be distinct")
    if tool_choice in (None, "auto"):
        return ToolSpec(tools, names, None)
    if tool_choice == "none":
        return ToolSpec(None, (), None)
    if tool_choice == "required":
        return ToolSpec(tools, names, call_schema(tools))
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or name not in names:
            raise ValueError(f"'tool_choice' names a function not in 'tools': {name!r}")
        return ToolSpec(tools, (name,), call_schema([tools[names.index(name)]]))
    raise ValueError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def function_name(tool, i: int) -> str:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
    name = tool["function"].get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tools[{i}].function.name must be a non-empty string")
    strict = tool["function"].get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"tools[{i}].function.strict must be true or false, not {strict!r:.40}")
    params = tool["function"].get("parameters")
    if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
        raise ValueError(f"tools[{i}].function.parameters must be a JSON schema of type \"object\" (the call's "
                         "arguments are an object)")
    return name


def call_schema(tools: list[dict]) -> dict:
    """The JSON schema of a call of one of `tools` in the template's format. Each tool's parameters go under
    `$defs` as "tool{i}", their own `$ref`s rebased there: "#/$defs/Item" (pydantic's nested models) would
    otherwise point into the wrapper schema."""
    try:
        defs = {f"tool{i}": rebase_refs(object_schema(t["function"].get("parameters")), f"#/$defs/tool{i}")
                for i, t in enumerate(tools)}
    except RecursionError:
        raise ValueError("a tool's parameters schema is nested too deeply") from None
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "parameters": {"$ref": f"#/$defs/tool{i}"}},
              "required": ["name", "parameters"], "additionalProperties": False} for i, t in enumerate(tools)]
    return {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "$defs": defs}


def object_schema(params: dict | None) -> dict:
    """A tool's parameters schema, typed "object" where it leaves the type out (function_name reads it so): the
    forced call's grammar then allows only an object of arguments, which parse_call accepts. Its `$id` is dropped:
    under `$defs` it would be the base its rebased `$ref`s resolve against."""
    params = {k: v for k, v in (params or {}).items() if k != "$id"}
    return params if "type" in params else {"type": "object", **params}


def rebase_refs(schema, root: str):
    """`schema` with every local `$ref` ("#...") made relative to `root` (the JSON pointer it moves to)."""
    if isinstance(schema, dict):
        return {k: root + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else rebase_refs(v, root)
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [rebase_refs(v, root) for v in schema]
    return schema


PYTHON_TAG = "<|python_tag|>"  # may open a call (when the reply keeps special tokens' text)


def parse_call(text: str, names: tuple[str, ...]) -> list[dict] | None:
    """OpenAI's `tool_calls` for a reply that is one call of a known tool; None for a text reply."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    args = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
    if not isinstance(args, dict) or value.get("name") not in names:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": value["name"], "arguments": json.dumps(args)}}]


def may_be_call(text: str) -> bool:
    """Whether a reply that begins with `text` may still be one parse_call reads (a JSON object, maybe after
    the python tag): a stream holds its pieces back until it is known."""
    body = text.lstrip()
    return body.startswith("{") or PYTHON_TAG.startswith(body) or \
        (body.startswith(PYTHON_TAG) and may_be_call(body[len(PYTHON_TAG):]))


def template_message(message: dict, i: int) -> dict:
    """A `tool` (or `ipython`) message or an assistant message with `tool_calls` as the template reads them: a
    tool result that is JSON is passed as its value, a call's arguments as an object."""
    if message.get("role") in ("tool", "ipython"):
        content = message.get("content")
        if isinstance(content, list):  # text parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        try:
            value = json.loads(content) if isinstance(content, str) else content
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to read: the text as it is
            value = content
        return {"role": message["role"], "content": value if isinstance(value, (dict, list)) else str(content)}
    calls = message["tool_calls"]
    if not isinstance(calls, list) or len(calls) != 1:
        raise ValueError(f"message {i}: this model takes exactly one tool call per assistant message")
    function = calls[0].get("function") if isinstance(calls[0], dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or "<|" in function["name"]:
        raise ValueError(f"message {i}: a tool call needs function.name (plain text)")
    args = function.get("arguments", {})
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise ValueError(f"message {i}: tool call arguments must be JSON") from None
    except RecursionError:  # (a raw RecursionError: a 500)
        raise ValueError(f"message {i}: tool call arguments are nested too deeply") from None
    if args is not None and not isinstance(args, dict):  # (null: no arguments)
        raise ValueError(f"message {i}: tool call arguments must be a JSON object, not {type(args).__name__}")
    return {"role": "assistant", "tool_calls": [{"function": {"name": function["name"], "arguments": args or {}}}]}
