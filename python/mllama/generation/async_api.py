"""The generation API for asyncio programs: `await model.achat(...)`, `async for chunk in await
model.achat(..., stream=True)`, `await model.adescribe(...)`. Requests join the same batch scheduler as the
threaded API's; the event loop never blocks: preparing a prompt and its images and every scheduler step run
on worker threads (asyncio.to_thread). A task cancelled while it waits, or a stream left early, stops its
request: the next step frees its sequence."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, AsyncIterator

from . import openai
from .api import tool_spec
from .chat_stream import ChatChunks, cancel_unfinished, content_pieces, describe_messages, ends_of
from .request import Request


class AsyncGenerationMixin:
    async def achat(self, messages: list[dict], *, stream: bool = False, n: int = 1, tools=None, tool_choice=None,
                    truncate: bool = False, **sampling) -> dict | AsyncIterator[dict]:
        """Model.chat for asyncio: the response dict, or with stream=True an async iterator of its chunks."""
        spec = tool_spec(tools, tool_choice, sampling)
        max_tokens = sampling.get("max_tokens", self.default_sampling.max_tokens)

        def prepare() -> Request:  # tokens, images decoded and preprocessed: off the event loop
            tokens, images = self.prompt_for(messages, tools=spec.tools if spec else None, truncate=truncate,
                                             max_tokens=max_tokens)
            return self.build_request(tokens, images, n=n, **sampling)

        request = await asyncio.to_thread(prepare)  # (cancelled here: nothing was queued)
        self.scheduler.submit(request)
        cid, created = openai.completion_id(), openai.now()
        if stream and not (spec and spec.tools):
            chunks = self._achunks(ChatChunks(self, cid, created, request))
            # dropped unread: an async generator never started runs no finally, so stop the request here
            weakref.finalize(chunks, cancel_unfinished, self.scheduler, request)
            return chunks
        results = await self._aresults(request)
        whole = openai.response(cid, created, self.name, results, spec.names if spec else ())
        return _aiter(openai.chunks_of(whole)) if stream else whole

    async def adescribe(self, image, prompt: str = "Describe this image.", *, stream: bool = False,
                        **sampling) -> str | AsyncIterator[str]:
        """Model.describe for asyncio: the text, or with stream=True an async iterator of its pieces."""
        messages = describe_messages(image, prompt, sampling)
        if stream:
            return _acontent_pieces(await self.achat(messages, stream=True, **sampling))
        response = await self.achat(messages, **sampling)
        return response["choices"][0]["message"]["content"]

    async def _astep(self) -> None:
        await asyncio.to_thread(self.run_step)

    async def _aresults(self, request: Request) -> list[Any]:
        try:
            while any(not s.done for s in request.streams):
                await self._astep()
        except BaseException:  # cancelled (or the model failed): the request stops at the next step
            self.scheduler.cancel(request)
            raise
        ends = ends_of(request)
        error = next((e for e in ends if isinstance(e, BaseException)), None)
        if error is not None:
            raise error
        return ends

    async def _achunks(self, chunks: ChatChunks) -> AsyncIterator[dict]:
        try:
            for chunk in chunks.first():
                yield chunk
            while chunks.pending:
                ready = chunks.ready()
                if ready is None:
                    await self._astep()
                    continue
                for chunk in ready:
                    yield chunk
                chunks.raise_error()
        finally:
            if chunks.pending and not self.closed:
                self.scheduler.cancel(chunks.request)  # left early: stopped at the next step


async def _acontent_pieces(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            for piece in content_pieces([chunk]):
                yield piece
    finally:
        await chunks.aclose()


async def _aiter(items: list) -> AsyncIterator:
    for item in items:
        yield item
