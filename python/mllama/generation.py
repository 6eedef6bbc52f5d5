"""The generation API of Model: tokenize, forward, generate, describe, chat (OpenAI-shaped), and
the streaming loop with stop strings. Mixed into mllama.Model; uses its engine under its lock."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Iterator

import numpy as np

from .chat_template import default_template, normalize, render_segments
from ._lib import MllamaError
from .engine import PreparedImage, image_key
from .sampling import SamplingParams, find_stop, sample
from .tokenizer import StreamDecoder


class GenerationMixin:
    # --- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of text (no BOS added); special-token strings count only with special=True."""
        return self.tokenizer.encode(text, allow_special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _prepare_images(self, images) -> list[PreparedImage]:
        from .preprocess import preprocess

        out = []
        for image in images:
            if isinstance(image, PreparedImage):
                out.append(image)
                continue
            pre = preprocess(image, self.image_config)
            source = str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
            out.append(PreparedImage(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles,
                                     image_key(pre.pixel_values, pre.aspect_ratio_id), source))
        return out

    def forward(self, token_ids: list[int], images=()) -> np.ndarray:
        """Logits of every position (n_tokens x n_vocab) for a fresh sequence; images attach to the
        <|image|> tokens in order."""
        prepared = self._prepare_images(images)
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
        bos = self.tokenizer.decode([self.hparams_cached["bos_token_id"]])
        segments = render_segments(self.chat_template, conv, bos_token=bos, add_generation_prompt=add_generation_prompt)
        tokens: list[int] = []
        for text, user in segments:
            tokens += self.tokenizer.encode(text, allow_special=not user)
        return tokens, conv.images

    @property
    def chat_template(self) -> str:
        return self._meta_string("tokenizer.chat_template") or default_template()

    # --- generation -------------------------------------------------------------------------
    def sampling_params(self, **overrides) -> SamplingParams:
        return self.default_sampling.with_overrides(**overrides)

    def generate_tokens(self, tokens: list[int], images=(), **sampling) -> Iterator[int]:
        """Generated token ids (end-of-generation ids excluded)."""
        params = self.sampling_params(**sampling)
        prepared = self._prepare_images(images)
        rng = np.random.default_rng(params.seed)
        with self._lock:
            self._handle()
            if self._generating:
                raise MllamaError("the model is busy with another generation: finish or close it first")
            self._generating = True
            try:
                yield from self._generate_locked(list(tokens), prepared, params, rng)
            finally:
                self._generating = False

    def _generate_locked(self, tokens: list[int], prepared, params, rng) -> Iterator[int]:
        engine = self._engine
        logits = engine.evaluate(tokens, prepared)  # ContextOverflowError past n_ctx
        history = list(tokens)
        # the last sampled token is never evaluated, so a full context still yields one token
        room = engine.n_ctx - len(tokens) + 1
        limit = min(params.max_tokens, room) if params.max_tokens is not None else room
        self.last_finish_reason = "length"
        for _ in range(limit):
            if not np.isfinite(logits).all():
                raise MllamaError("the model produced non-finite logits (NaN or Inf): corrupt weights or a numeric overflow")
            token = sample(logits, history, params, rng)
            if token in self.eog_ids:
                self.last_finish_reason = "stop"
                return
            yield token
            history.append(token)
            if len(engine.state.tokens) >= engine.n_ctx:
                return
            logits = engine.step(token, len(prepared))

    def generate(self, prompt: str | list[int], images=(), *, stream: bool = True, **sampling):
        """Text for a raw prompt (string with special tokens allowed, or token ids): a stream of text
        pieces, or the whole text with stream=False. Stops at an end-of-generation token, a stop
        string, max_tokens or the end of the context."""
        tokens = self.tokenize(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        pieces = self._stream_text(tokens, images, **sampling)
        return pieces if stream else "".join(pieces)

    def _stream_text(self, tokens: list[int], images, **sampling) -> Iterator[str]:
        params = self.sampling_params(**sampling)
        decoder = StreamDecoder(self.tokenizer)
        pending = ""
        self.last_usage = {"prompt_tokens": len(tokens), "completion_tokens": 0}
        for token in self.generate_tokens(tokens, images, **sampling):
            self.last_usage["completion_tokens"] += 1
            pending += decoder.push(token)
            cut, hold = find_stop(pending, params.stop)
            if cut >= 0:
                if pending[:cut]:
                    yield pending[:cut]
                self.last_finish_reason = "stop"
                return
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        pending += decoder.flush()
        cut, _ = find_stop(pending, params.stop)
        if cut >= 0:
            pending = pending[:cut]
            self.last_finish_reason = "stop"
        if pending:
            yield pending

    def describe(self, image, prompt: str = "Describe this image.", **sampling) -> str:
        """A description of one image (a one-turn chat: the image, then the prompt)."""
        response = self.chat([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}],
                             **sampling)
        return response["choices"][0]["message"]["content"]

    def chat(self, messages: list[dict], *, stream: bool = False, **sampling):
        """An OpenAI-shaped chat completion (or, with stream=True, an iterator of chunks)."""
        tokens, images = self.chat_prompt(messages)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if stream:
            return self._chat_chunks(completion_id, tokens, images, **sampling)
        text = "".join(self._stream_text(tokens, images, **sampling))
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self.last_finish_reason}],
            "usage": self._usage(),
        }

    create_chat_completion = chat  # llama-cpp-python's name

    def _usage(self) -> dict:
        u = self.last_usage
        return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

    def _chat_chunks(self, completion_id: str, tokens: list[int], images, **sampling) -> Iterator[dict]:
        created = int(time.time())

        def chunk(delta: dict, finish: str | None, **extra) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        yield chunk({"role": "assistant", "content": ""}, None)
        for piece in self._stream_text(tokens, images, **sampling):
            yield chunk({"content": piece}, None)
        yield chunk({}, self.last_finish_reason, usage=self._usage())
