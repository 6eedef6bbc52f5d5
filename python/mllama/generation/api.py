"""The generation API of Model: tokenize, forward, generate, stream_text, describe, chat
(OpenAI-shaped). Mixed into mllama.Model; uses its engine under its lock. Every call returns its own
results (a TextStream's GenerationResult, a response dict): nothing about a request is kept on the model."""

from __future__ import annotations

import time
import weakref
from typing import Any, Iterator

import numpy as np

from .._native.errors import ContextOverflowError, MllamaError
from ..text.chat_template import default_template, normalize, open_final_turn, render_segments, system_turn_first
from ..text.tokenizer import StreamDecoder
from ..text.tools import ToolSpec
from ..text.tools import resolve as resolve_tools
from . import openai
from .chat_stream import ChatChunks, cancel_unfinished, content_pieces, describe_messages, ends_of, one_reply
from .constrain import Grammar, GrammarState
from .context_fit import fit_chat
from .engine import PreparedImage, prepare_images
from .interrupts import deferred_interrupts
from .logprobs import check as check_logprobs
from .results import GenerationResult, TextStream
from .sampling import SamplingParams
from .request import Request


def tool_spec(tools, tool_choice, sampling: dict) -> ToolSpec | None:
    """A request's tools (see text/tools.py); a forced call constrains the reply to the call's schema,
    in `sampling` (which must then hold no other constraint)."""
    spec = resolve_tools(tools, tool_choice)
    if spec is not None and spec.schema is not None:
        if sampling.get("response_format") or sampling.get("grammar"):
            raise ValueError("'tool_choice' forcing a call cannot be combined with 'response_format' or a grammar")
        strict = any(t["function"].get("strict") is True for t in spec.tools if t["function"]["name"] in spec.names)
        schema = {"name": "tool_call", "schema": spec.schema, "strict": strict}  # (a strict tool: held as strictly)
        sampling["response_format"] = {"type": "json_schema", "json_schema": schema}
    return spec


def checked_ids(tokens) -> list[int]:
    """Token ids as ints (ValueError for a float or a bool, which were taken as the ids they round to)."""
    ids = list(tokens)
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
    if bad is not None:
        raise ValueError(f"{bad!r:.40} is not a token id (an integer)")
    return [int(t) for t in ids]


class GenerationMixin:
    # --- tokens and images ------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of text (no BOS added); special-token strings count only with special=True."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return self.tokenizer.encode(text, allow_special=special)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (ValueError for an id that is no token of the vocabulary)."""
        ids = list(tokens)
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))
                    or not 0 <= t < self.tokenizer.n_vocab), None)
        if bad is not None:
            raise ValueError(f"{bad!r:.40} is not a token id (0 <= id < {self.tokenizer.n_vocab})")
        try:
            return self.tokenizer.decode(ids)
        except KeyError as exc:  # an id the vocabulary leaves unused
            raise ValueError(f"token id {exc.args[0]} has no text (unused in the vocabulary)") from None

    def check_prompt_length(self, texts) -> None:
        """ContextOverflowError for prompt texts longer than the context by their length alone (Tokenizer.at_least)."""
        at_least = self.tokenizer.at_least(texts)
        if at_least > self.n_ctx:
            raise ContextOverflowError(f"the prompt has at least {at_least} tokens (by its length) but the context "
                                       f"holds {self.n_ctx} (n_ctx)")

    def prepare_images(self, images) -> list[PreparedImage]:
        """Preprocess images once for later calls (a PreparedImage passes through unchanged)."""
        return prepare_images(images, self.image_config)

    def forward(self, token_ids: list[int], images=()) -> np.ndarray:
        """Logits of every position (n_tokens x n_vocab) for a fresh sequence; images attach to the
        <|image|> tokens in order."""
        ids, prepared = checked_ids(token_ids), self.prepare_images(images)
        with self._lock:
            self._handle()
            self.scheduler.reap()
            free = [seq for seq, busy in enumerate(self.scheduler.busy) if not busy]
            if not free:
                raise MllamaError("every sequence is busy with a generation: finish or close one first")
            return self._engine.evaluate(ids, prepared, all_logits=True, seq=free[-1])

    @property
    def n_decoded(self) -> int:
        """Tokens the decoder has evaluated so far (prompt and generated)."""
        with self._lock:
            self._handle()  # (its context is gone once closed)
            return self._engine.n_decoded

    def memory(self) -> dict:
        """Bytes held beside the weights: kv_cache, image_slots and compute (scheduler buffers so far)."""
        with self._lock:
            self._handle()
            return self._engine.memory()

    # --- prompts ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, system_with_images: bool = False,
                    continue_final: bool = False, within_context: bool = False) -> tuple[list[int], list[Any]]:
        """Token ids and images of a conversation rendered with the model's chat template (with `tools`:
        OpenAI's tool list, shown to the model as the template does; text-only turns). Meta's template refuses
        a system prompt next to images (TemplateError); system_with_images=True renders it as Ollama's
        template does instead: a plain system turn before the conversation (the Ollama routes).
        continue_final=True: a last assistant message is left open, for the reply to go on with it.
        within_context=True: a prompt longer than the context by its length alone is refused before it is
        tokenized (ContextOverflowError; check_prompt_length), as its generation would be."""
        conv = normalize(messages)
        if continue_final:
            add_generation_prompt = False
        if tools is not None:
            resolve_tools(tools, None)  # (a string had been shown to the model letter by letter)
        if tools is not None and conv.images:
            raise ValueError("tools cannot be used together with images (Llama 3.2 Vision supports tool calls "
                             "in text-only conversations): drop the images or 'tools'")
        bos = self.tokenizer.decode([self.hparams.bos_token_id])
        system = conv.messages.pop(0) if system_with_images and conv.images and conv.messages and \
            conv.messages[0]["role"] == "system" else None
        segments = render_segments(self.chat_template, conv, bos_token=bos, add_generation_prompt=add_generation_prompt,
                                   tools=tools)
        if system is not None:
            segments = system_turn_first(segments, bos, conv, system["content"])
        if continue_final:
            segments = open_final_turn(segments, conv)
        if within_context:
            self.check_prompt_length(text for text, _ in segments)
        tokens: list[int] = []
        for text, user in segments:
            tokens += self.tokenizer.encode(text, allow_special=not user)
        return tokens, conv.images

    def prompt_for(self, messages: list[dict], *, tools: list[dict] | None = None, truncate: bool = False,
                   max_tokens=None) -> tuple[list[int], list[Any]]:
        """chat_prompt, or with truncate=True fitted to the context (context_fit.fit_chat)."""
        if not truncate:
            return self.chat_prompt(messages, tools=tools, within_context=True)
        fitted = fit_chat(self, messages, tools=tools, max_tokens=max_tokens)
        return fitted.tokens, fitted.images

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
        request = self.submit(list(tokens), images, grammar=grammar, response_format=response_format, **sampling)
        for kind, value in self.events(request):
            if kind == "token":
                yield value
            elif kind == "error":
                raise value

    def submit(self, tokens: list[int], images=(), *, n: int = 1, notify=None, grammar=None, response_format=None,
               logprobs: bool | None = None, top_logprobs: int | None = None, **sampling) -> Request:
        """Queue a prompt for the batch scheduler (n choices, each constrained by `grammar` or
        `response_format` when given: see compile_grammar); its streams' outboxes receive events as
        steps run (run_step, or iterate events()). `logprobs`/`top_logprobs` (0..20): each result
        carries OpenAI's logprobs items (see logprobs.py). Bad options, images or grammars raise here."""
        request = self.build_request(tokens, images, n=n, notify=notify, grammar=grammar,
                                     response_format=response_format, logprobs=logprobs, top_logprobs=top_logprobs,
                                     **sampling)
        self.scheduler.submit(request)
        return request

    def build_request(self, tokens: list[int], images=(), *, n: int = 1, notify=None, grammar=None,
                      response_format=None, logprobs: bool | None = None, top_logprobs: int | None = None,
                      **sampling) -> Request:
        """submit's Request, checked and with its images prepared, not yet queued (scheduler.submit queues it)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.n_seq_max:  # no streams yet
            raise ValueError(f"n must be an integer within [1, {self.n_seq_max}] (the context's sequences: "
                             f"n_seq_max), not {n!r:.40}")
        top = check_logprobs(logprobs, top_logprobs)
        constraint = self.compile_grammar(grammar, response_format=response_format)
        params, prepared = self.sampling_params(**sampling), self.prepare_images(images)
        return Request(checked_ids(tokens), prepared, params, self.tokenizer, n=n, notify=notify, grammar=constraint,
                       logprobs=top)

    def run_step(self) -> None:
        """One step of the batch scheduler: admit waiting requests, evaluate one batch, sample. Ctrl-C within
        it is raised after it (interrupts.py); a step asked for within a step (the cleanup of a stream dropped
        unread, run by the garbage collector in the middle of one) is left to the next one."""
        with self._lock, deferred_interrupts():
            self._handle()
            if not self.scheduler.stepping:
                self.scheduler.step()

    def events(self, request: Request, index: int = 0) -> Iterator[tuple[str, Any]]:
        """The events of one choice ("token", "text", then "result" or "error"), running steps while
        its outbox is empty; leaving early cancels the request."""
        stream, ended = request.streams[index], False
        try:
            while not ended:
                if not stream.events:
                    self.run_step()
                    continue
                kind, value = stream.events.popleft()
                ended = kind in ("result", "error")
                yield kind, value
        finally:
            if not self.closed and (not ended or any(not s.done for s in request.streams)):
                self.scheduler.cancel(request)
                self.run_step()  # frees its sequences now

    def generate(self, prompt: str | list[int], images=(), *, stream: bool = True, grammar=None,
                 response_format=None, **sampling) -> TextStream | str:
        """Text for a raw prompt (string with special tokens allowed, or token ids): a stream of text
        pieces, or the whole text with stream=False. Stops at an end-of-generation token, a stop
        string, max_tokens or the end of the context. `grammar`/`response_format`: see compile_grammar."""
        if isinstance(prompt, str):
            self.check_prompt_length([prompt])
        tokens = self.tokenize(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        pieces = self.stream_text(tokens, images, grammar=grammar, response_format=response_format, **sampling)
        return pieces if stream else pieces.finish().text

    def stream_text(self, tokens: list[int], images=(), *, grammar=None, response_format=None,
                    **sampling) -> TextStream:
        """The reply to prompt tokens as a TextStream: text pieces as they come (stop strings held back
        and cut), then its GenerationResult (text, finish reason, usage, timings) in `.result`.
        `grammar`/`response_format` constrain the reply (see compile_grammar); checked here, at the call."""
        one_reply(sampling, "stream_text gives one reply")
        request = self.build_request(list(tokens), images, grammar=grammar, response_format=response_format,
                                     **sampling)  # (bad options and images raise here; queued at the first piece)
        return TextStream(lambda stream: self._text_pieces(stream, request))

    def _text_pieces(self, stream: TextStream, request: Request) -> Iterator[str]:
        self.scheduler.submit(request)
        for kind, value in self.events(request):
            if kind == "text":
                yield value
            elif kind == "result":
                stream.result = value
            elif kind == "error":
                raise value

    def results(self, requests: list[Request]) -> list[list[GenerationResult]]:
        """Run steps until every request has ended; each one's results (one per choice). The first
        error of a request is raised after all have ended."""
        try:
            while any(not s.done for r in requests for s in r.streams):
                self.run_step()
        except BaseException:  # interrupted (KeyboardInterrupt), or the model failed: nothing is left running
            self._cancel(requests)
            raise
        ends = [ends_of(r) for r in requests]
        error = next((e for request_ends in ends for e in request_ends if isinstance(e, BaseException)), None)
        if error is not None:
            raise error
        return ends

    def _cancel(self, requests: list[Request]) -> None:
        """Stop requests that will not be read, freeing their sequences now."""
        if requests and not self.closed:
            for request in requests:
                self.scheduler.cancel(request)
            try:
                self.run_step()
            except Exception:  # the model itself fails: the error being raised already says so
                pass

    def describe(self, image, prompt: str = "Describe this image.", *, stream: bool = False,
                 **sampling) -> str | Iterator[str]:
        """A description of one image (a one-turn chat: the image, then the prompt); with stream=True an
        iterator of its text pieces as they come."""
        messages = describe_messages(image, prompt, sampling)
        if stream:
            return content_pieces(self.chat(messages, stream=True, **sampling))
        response = self.chat(messages, **sampling)
        return response["choices"][0]["message"]["content"]

    def chat(self, messages: list[dict], *, stream: bool = False, n: int = 1, tools=None, tool_choice=None,
             truncate: bool = False, **sampling) -> dict | Iterator[dict]:
        """An OpenAI-shaped chat completion with n choices (or, with stream=True, an iterator of chunks).
        `response_format`/`grammar` constrain the reply: see compile_grammar. `tools`/`tool_choice`
        (text-only turns): a reply that calls a tool comes back as `tool_calls` (streamed once whole).
        truncate=True: a conversation too long for the context leaves out its oldest messages
        (generation/context_fit.py) instead of raising ContextOverflowError."""
        spec = tool_spec(tools, tool_choice, sampling)
        tokens, images = self.prompt_for(messages, tools=spec.tools if spec else None, truncate=truncate,
                                         max_tokens=sampling.get("max_tokens", self.default_sampling.max_tokens))
        cid, created = openai.completion_id(), openai.now()
        if stream and not (spec and spec.tools):
            request = self.submit(tokens, images, n=n, **sampling)
            chunks = self._chat_chunks(cid, created, request)
            weakref.finalize(chunks, cancel_unfinished, self.scheduler, request)  # dropped before it was read
            return chunks
        results = self.results([self.submit(tokens, images, n=n, **sampling)])[0]
        whole = openai.response(cid, created, self.name, results, spec.names if spec else ())
        return iter(openai.chunks_of(whole)) if stream else whole

    def chat_many(self, conversations: list[list[dict]], *, truncate: bool = False, **sampling) -> list[dict]:
        """Chat completions for several conversations at once, evaluated together in batches (as many
        at a time as the context has sequences: n_seq_max); responses in the same order. truncate: as chat's."""
        requests = []
        max_tokens = sampling.get("max_tokens", self.default_sampling.max_tokens)
        try:
            for messages in conversations:
                prompt = self.prompt_for(messages, truncate=truncate, max_tokens=max_tokens)
                requests.append(self.submit(*prompt, **sampling))
        except BaseException:  # a bad conversation: none of them runs
            self._cancel(requests)
            raise
        cid, created = openai.completion_id, openai.now()
        return [openai.response(cid(), created, self.name, ends) for ends in self.results(requests)]

    create_chat_completion = chat  # llama-cpp-python's name

    def _chat_chunks(self, cid: str, created: int, request: Request) -> Iterator[dict]:
        chunks = ChatChunks(self, cid, created, request)
        yield from chunks.first()
        try:
            while chunks.pending:
                ready = chunks.ready()
                if ready is None:
                    self.run_step()
                    continue
                yield from ready
                chunks.raise_error()
        finally:
            if chunks.pending and not self.closed:
                self.scheduler.cancel(request)
                self.run_step()
