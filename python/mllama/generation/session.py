"""A multi-turn chat that keeps the model's caches across turns: each turn re-renders the whole
conversation, and the engine evaluates only the tokens after the longest common prefix (and encodes
only images it does not already hold). A conversation that outgrows the context leaves out its oldest
messages from the prompt (context_fit.py; the history keeps them), unless truncate=False."""

from __future__ import annotations

from typing import Any, Iterator

from .chat_stream import one_reply
from .context_fit import FittedPrompt, fit_chat
from .results import TextStream


class Chat:
    def __init__(self, model, *, system: str | None = None, truncate: bool = True, **sampling):
        self.model = model
        self.sampling = sampling
        self.truncate = truncate
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.n_left_out = 0  # messages of the history the last turn's prompt left out
        self._unread: dict | None = None  # the user message of a streamed turn whose reply has not started
        self._open: TextStream | None = None  # the last streamed turn (ended by the next send)

    def send(self, content: str, images: tuple[Any, ...] | list[Any] = (), *, stream: bool = False, **sampling):
        """Add a user turn and return the assistant's reply, or with stream=True a TextStream of its
        pieces (its `result` holds the finish reason, usage and timings once it has ended). A streamed
        reply closed or dropped before it was read leaves no turn (it goes at the next send). A send ends the
        streamed turn before it: one not read yet leaves no turn (its stream yields nothing), one being read
        keeps its reply as far as it went, so the history stays in the order of the turns."""
        one_reply({**self.sampling, **sampling}, "a chat turn gives one reply")
        self._end_open_turn()
        self._drop_unread()
        # preprocessed once here: later turns re-render the conversation without redoing the images
        parts: list[dict] = [{"type": "image", "image": image} for image in self.model.prepare_images(images)]
        parts.append({"type": "text", "text": content})
        message = {"role": "user", "content": parts}
        self.messages.append(message)
        sampling = {**self.sampling, **sampling}
        try:
            max_tokens = sampling.get("max_tokens", self.model.default_sampling.max_tokens)
            fitted = (fit_chat(self.model, self.messages, max_tokens=max_tokens) if self.truncate else
                      FittedPrompt(*self.model.chat_prompt(self.messages, within_context=True)))
            reply = self.model.stream_text(fitted.tokens, fitted.images, **sampling)  # (bad options raise here)
        except BaseException:
            self.messages.pop()
            raise
        self._unread = message
        pieces = TextStream(lambda stream: self._record(stream, message, fitted, reply))
        if not stream:
            return pieces.finish().text
        self._open = pieces
        return pieces

    def _end_open_turn(self) -> None:
        opened, self._open = self._open, None
        if opened is not None:
            opened.close()  # not started: nothing runs (the unread message goes next); started: its reply is kept

    def _drop_unread(self) -> None:
        if self._unread is not None and self.messages and self.messages[-1] is self._unread:
            self.messages.pop()
        self._unread = None

    def _record(self, stream: TextStream, message: dict, fitted: FittedPrompt, pieces: TextStream) -> Iterator[str]:
        if self._unread is message:
            self._unread = None
        text, failed = [], False
        try:
            for piece in pieces:
                text.append(piece)
                yield piece
            stream.result = pieces.result
        except GeneratorExit:  # the caller stopped reading: the reply is kept as far as it went
            raise
        except BaseException:
            failed = True
            raise
        finally:
            pieces.close()
            if failed and not text:  # the turn never happened (bad options, a prompt over the context): drop it
                self.messages.pop()
            else:  # an interrupted reply is kept as far as it went, so the history stays consistent
                self.messages.append({"role": "assistant", "content": "".join(text)})
                self.n_left_out = fitted.n_left_out

    def clear(self) -> None:
        self._end_open_turn()
        self._unread = None
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        self.messages, self.n_left_out = system, 0
