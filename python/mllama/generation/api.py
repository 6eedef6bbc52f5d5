"""The generation API of Model: tokenize, forward, generate, stream_text, describe, chat
(OpenAI-shaped). Mixed into mllama.Model; uses its engine under its lock. Every call returns its own
results (a TextStream's GenerationResult, a response dict): nothing about a request is kept on the model."""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np

from .._native.errors import MllamaError
from ..text.chat_template import default_template, normalize, render_segments
from ..text.tokenizer import StreamDecoder
from . import openai
from .constrain import Grammar, GrammarState
from .engine import PreparedImage, prepare_images
from .results import GenerationResult, RunRecord, TextStream, Timings, Usage
from .sampling import SamplingParams, find_stop, sample


class GenerationMixin:
    # --- tokens and images ------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of text (no BOS added); special-token strings count only with special=True."""
        return self.tokenizer.encode(text, allow_special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def prepare_images(self, images) -> list[PreparedImage]:
        """Preprocess images once for later calls (a PreparedImage passes through unchanged)."""
        return prepare_images(images, self.image_config)

    def forward(self, token_ids: list[int], images=()) -> np.ndarray:
        """Logits of every position (n_tokens x n_vocab) for a fresh sequence; images attach to the
        <|image|> tokens in order."""
        prepared = self.prepare_images(images)
        with self._lock:
            self._handle()
            if self._generating:
                raise MllamaError("the model is busy with another generation: finish or close it first")
            return self._engine.evaluate(list(map(int, token_ids)), prepared, all_logits=True)

    @property
    def n_decoded(self) -> int:
        """Tokens the decoder has evaluated so far (prompt and generated)."""
        return self._engine.n_decoded

    def memory(self) -> dict:
        """Bytes held beside the weights: kv_cache, image_slots and compute (scheduler buffers so far)."""
        with self._lock:
            self._handle()
            return self._engine.memory()

    # --- prompts ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], *, add_generation_prompt: bool = True) -> tuple[list[int], list[Any]]:
        """Token ids and images of a conversation rendered with the model's chat template."""
        conv = normalize(messages)
        bos = self.tokenizer.decode([self.hparams.bos_token_id])
        segments = render_segments(self.chat_template, conv, bos_token=bos, add_generation_prompt=add_generation_prompt)
        tokens: list[int] = []
        for text, user in segments:
            tokens += self.tokenizer.encode(text, allow_special=not user)
        return tokens, conv.images

    @property
    def chat_template(self) -> str:
        return self.meta_string("tokenizer.chat_template") or default_template()

    # --- generation -------------------------------------------------------------------------
    def sampling_params(self, **overrides) -> SamplingParams:
        return self.default_sampling.with_overrides(**overrides)

    def compile_grammar(self, grammar=None, *, response_format=None) -> Grammar | None:
        """The constraint of a request, compiled for this model (None: unconstrained). `response_format`
        is OpenAI's ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}},
        {"type": "text"}); `grammar` is Lark text, {"lark": text}, {"regex": pattern} or a Grammar.
        A compiled Grammar can be passed as `grammar=` to any number of calls. Invalid: ValueError."""
        return Grammar.resolve(self.grammar_vocabulary, grammar=grammar, response_format=response_format)

    def generate_tokens(self, tokens: list[int], images=(), *, grammar=None, response_format=None,
                        **sampling) -> Iterator[int]:
        """Generated token ids (end-of-generation ids excluded)."""
        constraint = self.compile_grammar(grammar, response_format=response_format)
        params, prepared = self.sampling_params(**sampling), self.prepare_images(images)
        yield from self._tokens(list(tokens), prepared, params, RunRecord(prompt_tokens=len(tokens)), constraint)

    def _tokens(self, tokens: list[int], prepared: list[PreparedImage], params: SamplingParams,
                record: RunRecord, constraint: Grammar | None = None) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        with self._lock:
            self._handle()
            if self._generating:
                raise MllamaError("the model is busy with another generation: finish or close it first")
            self._generating = True
            try:
                yield from self._generate_locked(tokens, prepared, params, rng, record, constraint)
            finally:
                self._generating = False

    def _generate_locked(self, tokens: list[int], prepared, params, rng, record: RunRecord,
                         constraint: Grammar | None = None) -> Iterator[int]:
        engine = self._engine
        grammar: GrammarState | None = constraint.start() if constraint is not None else None
        record.started = time.perf_counter()
        logits = engine.evaluate(tokens, prepared)  # ContextOverflowError past n_ctx
        history = list(tokens)
        # the last sampled token is never evaluated, so a full context still yields one token
        room = engine.n_ctx - len(tokens) + 1
        limit = min(params.max_tokens, room) if params.max_tokens is not None else room
        for _ in range(limit):
            if not np.isfinite(logits).all():
                raise MllamaError("the model produced non-finite logits (NaN or Inf): corrupt weights or a numeric overflow")
            allowed = grammar.allowed_tokens() if grammar is not None else None
            token = sample(logits, history, params, rng, allowed)
            if record.first_token is None:
                record.first_token = time.perf_counter()
            if token in self.eog_ids:
                record.finish_reason = "stop"
                return
            if grammar is not None:
                grammar.advance(token)
            record.completion_tokens += 1
            yield token
            history.append(token)
            if len(engine.state.tokens) >= engine.n_ctx:
                return
            logits = engine.step(token, len(prepared))

    def generate(self, prompt: str | list[int], images=(), *, stream: bool = True, grammar=None,
                 response_format=None, **sampling):
        """Text for a raw prompt (string with special tokens allowed, or token ids): a stream of text
        pieces, or the whole text with stream=False. Stops at an end-of-generation token, a stop
        string, max_tokens or the end of the context. `grammar`/`response_format`: see compile_grammar."""
        tokens = self.tokenize(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        pieces = self.stream_text(tokens, images, grammar=grammar, response_format=response_format, **sampling)
        return pieces if stream else pieces.finish().text

    def stream_text(self, tokens: list[int], images=(), *, grammar=None, response_format=None,
                    **sampling) -> TextStream:
        """The reply to prompt tokens as a TextStream: text pieces as they come (stop strings held back
        and cut), then its GenerationResult (text, finish reason, usage, timings) in `.result`.
        `grammar`/`response_format` constrain the reply (see compile_grammar); checked here, at the call."""
        tokens = list(tokens)
        constraint = self.compile_grammar(grammar, response_format=response_format)
        return TextStream(lambda stream: self._text_pieces(stream, tokens, images, sampling, constraint))

    def _text_pieces(self, stream: TextStream, tokens: list[int], images, sampling: dict,
                     constraint: Grammar | None) -> Iterator[str]:
        params, prepared = self.sampling_params(**sampling), self.prepare_images(images)
        record = RunRecord(prompt_tokens=len(tokens))
        decoder = StreamDecoder(self.tokenizer)
        pending, text = "", []
        for token in self._tokens(tokens, prepared, params, record, constraint):
            pending += decoder.push(token)
            cut, hold = find_stop(pending, params.stop)
            if cut >= 0:
                pending, record.finish_reason = pending[:cut], "stop"
                break
            if len(pending) > hold:
                text.append(pending[:len(pending) - hold])
                yield text[-1]
                pending = pending[len(pending) - hold:]
        else:
            pending += decoder.flush()
            cut, _ = find_stop(pending, params.stop)
            if cut >= 0:
                pending, record.finish_reason = pending[:cut], "stop"
        if pending:
            text.append(pending)
            yield pending
        stream.result = _result("".join(text), record)

    def describe(self, image, prompt: str = "Describe this image.", **sampling) -> str:
        """A description of one image (a one-turn chat: the image, then the prompt)."""
        content = [{"type": "image", "image": image}, {"type": "text", "text": prompt}]
        response = self.chat([{"role": "user", "content": content}], **sampling)
        return response["choices"][0]["message"]["content"]

    def chat(self, messages: list[dict], *, stream: bool = False, response_format=None, grammar=None, **sampling):
        """An OpenAI-shaped chat completion (or, with stream=True, an iterator of chunks).
        `response_format`/`grammar` constrain the reply: see compile_grammar."""
        tokens, images = self.chat_prompt(messages)
        pieces = self.stream_text(tokens, images, response_format=response_format, grammar=grammar, **sampling)
        cid, created = openai.completion_id(), openai.now()
        if stream:
            return self._chat_chunks(cid, created, pieces)
        return openai.response(cid, created, self.name, pieces.finish())

    create_chat_completion = chat  # llama-cpp-python's name

    def _chat_chunks(self, cid: str, created: int, pieces: TextStream) -> Iterator[dict]:
        yield openai.chunk(cid, created, self.name, {"role": "assistant", "content": ""}, None)
        for piece in pieces:
            yield openai.chunk(cid, created, self.name, {"content": piece}, None)
        result = pieces.result
        yield openai.chunk(cid, created, self.name, {}, result.finish_reason, usage=result.usage.as_dict())


def _result(text: str, record: RunRecord) -> GenerationResult:
    end = time.perf_counter()
    first = record.first_token if record.first_token is not None else end
    started = record.started or first
    return GenerationResult(text, record.finish_reason, Usage(record.prompt_tokens, record.completion_tokens),
                            Timings(prompt_s=first - started, generate_s=end - first))
