"""A multi-turn chat that keeps the model's caches across turns: each turn re-renders the whole
conversation, and the engine evaluates only the tokens after the longest common prefix (and encodes
only images it does not already hold). A conversation that outgrows the context leaves out its oldest
messages from the prompt (context_fit.py; the history keeps them), unless truncate=False."""

from __future__ import annotations

from typing import Any, Iterator

from .context_fit import fit_chat
from .results import TextStream


class Chat:
    def __init__(self, model, *, system: str | None = None, truncate: bool = True, **sampling):
        self.model = model
        self.sampling = sampling
        self.truncate = truncate
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.n_left_out = 0  # the oldest messages of the history the last turn's prompt left out

    def send(self, content: str, images: tuple[Any, ...] | list[Any] = (), *, stream: bool = False, **sampling):
        """Add a user turn and return the assistant's reply, or with stream=True a TextStream of its
        pieces (its `result` holds the finish reason, usage and timings once it has ended)."""
        # preprocessed once here: later turns re-render the conversation without redoing the images
        parts: list[dict] = [{"type": "image", "image": image} for image in self.model.prepare_images(images)]
        parts.append({"type": "text", "text": content})
        self.messages.append({"role": "user", "content": parts})
        sampling = {**self.sampling, **sampling}
        try:
            if self.truncate:
                max_tokens = sampling.get("max_tokens", self.model.default_sampling.max_tokens)
                fitted = fit_chat(self.model, self.messages, max_tokens=max_tokens)
                tokens, all_images, self.n_left_out = fitted.tokens, fitted.images, fitted.n_left_out
            else:
                tokens, all_images = self.model.chat_prompt(self.messages)
        except BaseException:
            self.messages.pop()
            raise
        pieces = self._reply(tokens, all_images, sampling)
        return pieces if stream else pieces.finish().text

    def _reply(self, tokens, images, sampling) -> TextStream:
        return TextStream(lambda stream: self._record(stream, tokens, images, sampling))

    def _record(self, stream: TextStream, tokens, images, sampling) -> Iterator[str]:
        text, failed = [], False
        try:
            pieces = self.model.stream_text(tokens, images, **sampling)
            try:
                for piece in pieces:
                    text.append(piece)
                    yield piece
                stream.result = pieces.result
            finally:
                pieces.close()
        except GeneratorExit:  # the caller stopped reading: the reply is kept as far as it went
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if failed and not text:  # the turn never happened (bad options, a prompt over the context): drop it
                self.messages.pop()
            else:  # an interrupted reply is kept as far as it went, so the history stays consistent
                self.messages.append({"role": "assistant", "content": "".join(text)})

    def clear(self) -> None:
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        self.messages, self.n_left_out = system, 0
