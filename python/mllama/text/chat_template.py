"""Chat template rendering (sandboxed jinja2) and message normalization.

Messages may be OpenAI-style (`content` a string or a list of `text` / `image_url` parts, where an
image_url is a data: URL or a local path), carry an Ollama-style `images` list, or hold images
directly (PIL images, paths, bytes, arrays as `{"type": "image", "image": ...}` parts).

User text is kept apart from the template's own text: each text part is rendered as a marker, and
`render_segments` returns (text, is_user_text) pieces so the tokenizer can treat special-token
strings typed by a user as ordinary text.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from importlib.resources import files
from typing import Any

from .._native.errors import TemplateError
from .tools import template_message


def default_template() -> str:
    return files("mllama").joinpath("data/llama32_vision_instruct.jinja").read_text()


def tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False) -> str:
    """JSON as Hugging Face's templates write it (keys in their order, not HTML-escaped); "<|" is written
    "<\\u007c" (the same JSON) so that no special token can come out of data (tools, tool results)."""
    text = json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    return text.replace("<|", "<\\u007c")


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass
class Conversation:
    messages: list[dict]                      # template-ready messages (text parts replaced by markers)
    images: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    # in every marker: no text of a request (tools, tool results, icon fonts' private-use characters) can be one
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    def marker(self, i: int) -> str:
        return f"\ue000{self.nonce}:{i}\ue001"

    @cached_property
    def markers(self) -> re.Pattern:
        return re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")


def _decode_image_url(url: str) -> Any:
    """An image_url's image as load_image reads it (data: URLs, file:// and paths; one set of rules, there)."""
    if "://" in url and not url.startswith("file://"):
        raise ValueError("remote image URLs are not fetched; pass a data: URL or a local path")
    return url


ROLES = ("system", "user", "assistant", "tool", "ipython")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message


def normalize(messages: list[dict]) -> Conversation:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of messages, not {messages!r:.40}")
    conv = Conversation([])

    def part_text(part: dict, i: int) -> str:
        text = part.get("text", "")
        if not isinstance(text, str):
            raise ValueError(f"message {i}: a text part's text must be a string, not {type(text).__name__}")
        return text

    def text_part(text: str) -> dict:
        if not text:  # (nothing to keep from the template: the template's own tests of "" see it empty)
            return {"type": "text", "text": ""}
        conv.texts.append(text)
        return {"type": "text", "text": conv.marker(len(conv.texts) - 1)}

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with a 'role'")
        role, content = message["role"], message.get("content", "")
        content = "" if content is None else content  # OpenAI's clients send null content (an empty message)
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r:.40} (one of {', '.join(ROLES)}, or developer)")
        if role != message["role"]:
            message = {**message, "role": role}
        if role in ("tool", "ipython") or message.get("tool_calls"):  # (the template writes a tool result as JSON)
            if message.get("images") or isinstance(content, list) and any(
                    isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in content):  # (dropped)
                raise ValueError(f"message {i}: images go in user messages, not in a {role} message")
            conv.messages.append(template_message({**message, "content": content}, i))
            continue
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(part_text(p, i) for p in content)  # text parts only: one string
        parts: list[dict] = []
        if not isinstance(message.get("images") or [], (list, tuple)):  # (a string had been read letter by letter)
            raise ValueError(f"message {i}: images must be a list of images")
        for image in message.get("images", []) or []:  # Ollama style: images come first
            conv.images.append(image)
            parts.append({"type": "image"})
        if isinstance(content, str):
            if role == "system" and i == 0:
                content = content.strip()  # the template trims the system prompt (the first system message)
            if parts:
                parts.append(text_part(content))
            else:
                conv.messages.append({"role": role, "content": text_part(content)["text"]})
                continue
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(text_part(part_text(part, i)))
                elif kind == "image_url":
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if not isinstance(url, str):
                        raise ValueError(f"message {i}: an image_url's url must be a string")
                    conv.images.append(_decode_image_url(url))
                    parts.append({"type": "image"})
                elif kind == "image":
                    conv.images.append(part.get("image", part.get("url")))
                    parts.append({"type": "image"})
                else:
                    raise ValueError(f"message {i}: unsupported content part {part!r:.80}")
        elif content is not None:
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        if role != "user" and any(part.get("type") == "image" for part in parts):
            raise ValueError(f"message {i}: images go in user messages, not in a {role} message")
        conv.messages.append({"role": role, "content": parts})
    return conv


def render_segments(template: str, conv: Conversation, *, bos_token: str, add_generation_prompt: bool = True,
                    date_string: str | None = None, tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_user_text) segments (`tools`: OpenAI's, shown to the model)."""
    from jinja2 import TemplateError as JinjaError

    kwargs = {"messages": conv.messages, "bos_token": bos_token, "add_generation_prompt": add_generation_prompt}
    if tools is not None:
        kwargs["tools"] = tools
    if date_string is not None:
        kwargs["date_string"] = date_string
    if tools is not None:
        _trim_first_message(conv)
    try:
        rendered = _compile(template).render(**kwargs)
    except JinjaError as exc:
        raise TemplateError(f"chat template error: {exc}") from None
    except RecursionError:  # (a tool's JSON nested thousands deep, written by tojson)
        raise TemplateError("chat template error: a value nested too deeply") from None
    segments: list[tuple[str, bool]] = []
    pos = 0
    for match in conv.markers.finditer(rendered):
        if match.start() > pos:
            segments.append((rendered[pos:match.start()], False))
        segments.append((conv.texts[int(match.group(1))], True))
        pos = match.end()
    if pos < len(rendered):
        segments.append((rendered[pos:], False))
    return segments


def _trim_first_message(conv: Conversation) -> None:
    """The template puts the tools in the first message after the system's and trims that message's text: trimmed
    here, where its text is (the template's `|trim` sees only its marker: the text had kept its spaces)."""
    first = next((m for m in conv.messages if m["role"] != "system"), None)
    found = conv.markers.fullmatch(first["content"]) if first and isinstance(first["content"], str) else None
    if found is not None:
        conv.texts[int(found.group(1))] = conv.texts[int(found.group(1))].strip()


def render(template: str, messages: list[dict], **kwargs) -> str:
    """The rendered prompt as one string (user text inserted back)."""
    return "".join(text for text, _ in render_segments(template, normalize(messages), **kwargs))


SYSTEM_TURN = ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")  # Llama 3's frame of a turn


def system_turn_first(segments: list[tuple[str, bool]], bos: str, conv: Conversation,
                      marker: str) -> list[tuple[str, bool]]:
    """`segments` (`conv` rendered without its system message) with that message (`marker`: its text's
    marker) as a plain system turn right after the BOS: what Ollama's template writes for a system prompt
    next to images, where Meta's refuses it."""
    first, is_user = segments[0] if segments else ("", True)
    found = conv.markers.fullmatch(marker)
    if is_user or not first.startswith(bos) or found is None:
        raise TemplateError("the chat template does not start with the BOS token: cannot place the system prompt")
    head, tail = SYSTEM_TURN
    system = conv.texts[int(found.group(1))]
    return [(bos + head, False), (system, True), (tail + first[len(bos):], False), *segments[1:]]


def open_final_turn(segments: list[tuple[str, bool]], conv: Conversation) -> list[tuple[str, bool]]:
    """`segments` (`conv` rendered without a generation prompt) with its last message, an assistant's, left
    open for the model to go on with: the end of turn after its text taken off, no new turn begun (what
    Ollama's template does with a last assistant message, and vLLM's continue_final_message)."""
    last = conv.messages[-1] if conv.messages else {}
    if last.get("role") != "assistant" or last.get("tool_calls"):
        raise TemplateError("only a last assistant message (not a tool call) can be continued")
    end = SYSTEM_TURN[1]
    text, is_user = segments[-1] if segments else ("", True)
    if is_user or not text.rstrip().endswith(end):
        raise TemplateError("the chat template does not end a turn with <|eot_id|>: cannot continue the message")
    head = text.rstrip()[: -len(end)]
    return [*segments[:-1], (head, False)] if head else segments[:-1]
