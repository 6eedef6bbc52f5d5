"""A conversation longer than the context, fitted to it by leaving out its oldest messages: Ollama's
chat history truncation (its `truncate`, on by default in /api/chat) with the cache reuse of llama.cpp's
context shift.

The system prompt (a first system message: the only one the template treats as such) and the last message
always stay; the prompt keeps the most recent messages that fit, starting at a message that the template
can start a conversation with: never a tool result without the call it answers, and when the first kept
message is not a user message, the user message it follows (the question a run of tool calls answers) is
kept ahead of it. A cut does not move by single messages from turn to turn: cut points lie on a grid of half
the room the system prompt leaves (the weights of the messages before them), so the next turns of the same
conversation keep the same prompt prefix (the engine evaluates only their new tokens) until the history has
grown by another half of that room. Images of left-out messages go with them; the kept messages also hold
no more images than the context has image slots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from .._native.errors import ContextOverflowError
from ..text.chat_template import ROLE_ALIASES, normalize

_HEADER_TOKENS = 5  # <|start_header_id|>, the role, <|end_header_id|>, "\n\n", <|eot_id|>
_DATE_HEADER_TOKENS = 32  # the template's knowledge and today's dates above the system prompt


@dataclass(frozen=True)
class FittedPrompt:
    tokens: list[int]
    images: list[Any] = field(default_factory=list)
    n_left_out: int = 0  # messages of the conversation not in the prompt


def reply_room(n_ctx: int, max_tokens) -> int:
    """Tokens kept free for the reply when messages have to be left out: max_tokens, at most a quarter of
    the context (without max_tokens: a quarter; a bad max_tokens gets its error from the sampling checks)."""
    quarter = max(1, n_ctx // 4)
    valid = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
    return min(max_tokens, quarter) if valid else quarter


def fit_chat(model, messages: list[dict], *, tools: list[dict] | None = None, max_tokens: int | None = None,
             system_with_images: bool = False, continue_final: bool = False) -> FittedPrompt:
    """The prompt of `messages` (Model.chat_prompt) within the model's context: as it is when it leaves
    reply_room() tokens free and holds at most n_image_slots images, otherwise without its oldest messages
    (module docstring). A last message too long on its own is left to the engine's error."""
    normalize(messages)  # a bad message is named by its index in `messages`, not in a shorter candidate
    render = {"tools": tools, "system_with_images": system_with_images,  # Model.chat_prompt's keywords
              "continue_final": continue_final, "within_context": True}
    fit = _Fitting(model, messages, render, model.n_ctx - reply_room(model.n_ctx, max_tokens))
    whole = None if len(fit.rest) >= 2 and fit.clearly_over else fit.rendered(messages)
    if len(fit.rest) < 2 or not fit.cuts or whole is not None and fit.fits(*whole):
        # (nothing to leave out, or nothing the template could start with: the engine says what is too long)
        return FittedPrompt(*(whole or model.chat_prompt(messages, **render)))
    first = fit.first_fitting()
    if first is None:
        kept = fit.kept(fit.cuts[-1])
        return FittedPrompt(*model.chat_prompt(kept, **render), n_left_out=len(messages) - len(kept))
    cut = fit.on_grid(first)
    kept = fit.kept(cut)
    prompt = fit.rendered(kept)
    if cut != first and (prompt is None or not fit.fits(*prompt)):  # the grid's cut holds more images or text
        kept = fit.kept(first)
        prompt = model.chat_prompt(kept, **render)
    return FittedPrompt(*prompt, n_left_out=len(messages) - len(kept))


class _Fitting:
    """One conversation's candidate cuts. `rest`: the messages after the system prompt (indices into
    `messages`); a cut c keeps rest[c:] (and the user message before it when rest[c] is not one)."""

    def __init__(self, model, messages: list[dict], render: dict, budget: int):
        self.model, self.messages, self.render, self.budget = model, messages, render, budget
        tools = render["tools"]
        self.head = messages[:1] if messages and _role(messages[0]) == "system" else []
        self.rest = list(range(len(self.head), len(messages)))
        parts = [normalize([messages[i]]) for i in self.rest]
        self.weights = [_weight(model, conv) for conv in parts]
        self.n_images = [len(conv.images) for conv in parts]
        self.before = [0, *accumulate(self.weights)]  # before[c]: the weight of rest[:c]
        self.roles = [_role(messages[i]) for i in self.rest]
        self.images_from = [*accumulate(reversed(self.n_images))][::-1] + [0]  # images_from[c]: those of rest[c:]
        self.user_before, last = [], None  # user_before[c]: the last user message in rest[:c]
        for role in self.roles:
            self.user_before.append(last)
            last = len(self.user_before) - 1 if role == "user" else last
        self.cuts = [c for c in range(1, len(self.rest)) if self.roles[c] not in ("tool", "ipython")]
        head = sum(_weight(model, normalize([m])) for m in self.head) + _DATE_HEADER_TOKENS
        if tools:
            head += _count(model, json.dumps(tools, default=str))
        self.quantum = max(1, (budget - head) // 2)
        # far over: no need to render the whole (maybe very long) conversation to know it does not fit
        self.clearly_over = head + self.before[-1] > 2 * budget

    def rendered(self, messages: list[dict]) -> tuple[list[int], list] | None:
        """Model.chat_prompt of candidate messages; None for those longer than the context by their length alone."""
        try:
            return self.model.chat_prompt(messages, **self.render)
        except ContextOverflowError:
            return None

    def fits(self, tokens: list[int], images: list) -> bool:
        return len(tokens) <= self.budget and len(images) <= self.model.n_image_slots

    def anchor(self, c: int) -> int | None:
        """The user message kept ahead of rest[c] when that is not a user message (index into rest)."""
        return None if self.roles[c] == "user" else self.user_before[c]

    def kept(self, c: int) -> list[dict]:
        a = self.anchor(c)
        return [*self.head, *([] if a is None else [self.messages[self.rest[a]]]),
                *(self.messages[i] for i in self.rest[c:])]

    def estimate(self, c: int) -> tuple[int, int]:
        """The weight and the images of what cut c keeps after the system prompt."""
        a = self.anchor(c)
        extra = (0, 0) if a is None else (self.weights[a], self.n_images[a])
        return self.before[-1] - self.before[c] + extra[0], self.images_from[c] + extra[1]

    def first_fitting(self) -> int | None:
        """The cut that keeps the most messages and fits: from the first whose estimate fits (the images
        counted exactly), checked on the rendered prompt, moving on while it does not fit."""
        head = len(self.model.chat_prompt(self.kept(self.cuts[-1]), **self.render)[0]) - self.estimate(
            self.cuts[-1])[0]  # the rendered cost of the system prompt and the template's frame
        start = next((i for i, c in enumerate(self.cuts) if head + self.estimate(c)[0] <= self.budget and
                      self.estimate(c)[1] <= self.model.n_image_slots), len(self.cuts) - 1)
        for c in self.cuts[start:]:
            prompt = self.rendered(self.kept(c))
            if prompt is not None and self.fits(*prompt):
                return c
        return None

    def on_grid(self, first: int) -> int:
        """The first grid cut at or after `first`: the first cut whose older messages weigh k quanta, for
        the smallest such k (`first` itself when the grid has no cut there)."""
        k = max(1, self.before[first] // self.quantum)
        while k * self.quantum <= self.before[-1]:
            cut = next((c for c in self.cuts if self.before[c] >= k * self.quantum), None)
            if cut is None:
                break
            if cut >= first:
                return cut
            k += 1
        return first


def _role(message: dict) -> str:
    role = message.get("role") if isinstance(message, dict) else None
    return ROLE_ALIASES.get(role, role) if isinstance(role, str) else ""


def _weight(model, conv) -> int:
    """About the tokens one normalized message takes in a prompt, from it alone (so that a grid cut depends
    only on the messages before it): its texts, its images (one token each) and a role header; a tool call
    or result, as the template writes it (JSON)."""
    if not conv.texts:  # a tool call or result: the template's text of it
        return _count(model, json.dumps(conv.messages, default=str, ensure_ascii=False))
    return _count(model, "".join(conv.texts)) + len(conv.images) + _HEADER_TOKENS


def _count(model, text: str) -> int:
    """The tokens of text; for a text longer than the context by its length alone, that bound (it is never
    kept, and tokenizing it could take a minute)."""
    at_least = model.tokenizer.at_least([text])
    return at_least if at_least > model.n_ctx else len(model.tokenize(text))
