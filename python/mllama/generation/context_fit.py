"""A conversation longer than the context, fitted to it by leaving out its oldest messages: Ollama's
chat history truncation (its `truncate`, on by default in /api/chat) with the reuse of llama.cpp's context
shift. The system messages and the last message always stay; the others go from the oldest, a quantum of
half the context at a time, and the cut points depend only on the messages before them, so that the next
turns of the same conversation keep the same prompt prefix (the engine evaluates only their new tokens)
until the history has grown by another half context. A cut moves on to the next user message, so that a
prompt starts with a user turn where it can. Images of left-out messages go with them; the fitted
conversation also holds no more images than the context has image slots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..text.chat_template import ROLE_ALIASES, normalize


@dataclass(frozen=True)
class FittedPrompt:
    tokens: list[int]
    images: list[Any] = field(default_factory=list)
    n_left_out: int = 0  # the oldest messages of the conversation not in the prompt


def reply_room(n_ctx: int, max_tokens) -> int:
    """Tokens kept free for the reply when messages have to be left out: max_tokens, at most a quarter of
    the context (without max_tokens: a quarter; a bad max_tokens gets its error from the sampling checks)."""
    quarter = max(1, n_ctx // 4)
    valid = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
    return min(max_tokens, quarter) if valid else quarter


def fit_chat(model, messages: list[dict], *, tools: list[dict] | None = None,
             max_tokens: int | None = None) -> FittedPrompt:
    """The prompt of `messages` (Model.chat_prompt) within the model's context: as it is when it leaves
    reply_room() tokens free and holds at most n_image_slots images, otherwise without its oldest
    messages (module docstring). A last message too long on its own is left to the engine's error."""
    tokens, images = model.chat_prompt(messages, tools=tools)
    budget, n_slots = model.n_ctx - reply_room(model.n_ctx, max_tokens), model.n_image_slots
    if len(tokens) <= budget and len(images) <= n_slots:
        return FittedPrompt(tokens, images)
    rest = [i for i, m in enumerate(messages) if _role(m) != "system"]  # the messages that may go
    if len(rest) < 2:
        return FittedPrompt(tokens, images)
    weights = [_weight(model, messages[i]) for i in rest]
    quantum, k = max(1, model.n_ctx // 2), 0
    cut = _at_user(messages, rest, _image_cut(messages, rest, n_slots))  # only what the image slots need
    while True:
        if cut:
            first = rest[cut]
            kept = [m for i, m in enumerate(messages) if i >= first or _role(m) == "system"]
            tokens, images = model.chat_prompt(kept, tools=tools)
        if (len(tokens) <= budget and len(images) <= n_slots) or cut == len(rest) - 1:
            return FittedPrompt(tokens, images, n_left_out=cut)
        k += 1  # k quanta of weight go (or at least one more message)
        cut = _at_user(messages, rest, max(cut + 1, _weight_cut(weights, k * quantum)))


def _image_cut(messages: list[dict], rest: list[int], n_slots: int) -> int:
    """How many of the oldest messages must go for the others to hold at most n_slots images."""
    counts = [len(normalize([messages[i]]).images) for i in rest]
    cut, extra = 0, sum(counts) - n_slots
    while extra > 0 and cut < len(rest):
        extra -= counts[cut]
        cut += 1
    return cut


def _weight_cut(weights: list[int], drop: int) -> int:
    """How many of the oldest messages carry at least `drop` weight (all of them if they do not)."""
    total, cut = 0, 0
    while cut < len(weights) and total < drop:
        total += weights[cut]
        cut += 1
    return cut


def _at_user(messages: list[dict], rest: list[int], cut: int) -> int:
    """`cut` (an index into `rest`) moved on to the next user message if there is one before the last
    message; never past the last message."""
    cut = min(cut, len(rest) - 1)
    while cut < len(rest) - 1 and _role(messages[rest[cut]]) != "user":
        cut += 1
    return cut


def _role(message: dict) -> str:
    role = message.get("role") if isinstance(message, dict) else None
    return ROLE_ALIASES.get(role, role) if isinstance(role, str) else ""


def _weight(model, message: dict) -> int:
    """About the tokens `message` takes in a prompt, from it alone (so that a cut point depends only on the
    messages before it): its texts, its images (one token each) and a role header; a tool call or result, as
    the template writes it (JSON)."""
    conv = normalize([message])
    if not conv.texts:  # a tool call or result: the template's text of it
        return len(model.tokenize(json.dumps(conv.messages, default=str, ensure_ascii=False)))
    return len(model.tokenize("".join(conv.texts))) + len(conv.images) + _HEADER_TOKENS


_HEADER_TOKENS = 5  # <|start_header_id|>, the role, <|end_header_id|>, "\n\n", <|eot_id|>
