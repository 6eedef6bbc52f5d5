"""OpenAI's /v1/completions: a raw prompt (a string, special tokens allowed and no BOS added, as
Model.generate; or token ids) continued with n choices, streamed as server-sent events or whole;
`logprobs: k` (0..5) in this endpoint's own shape (generation/logprobs.py), every chunk with its tokens'."""

from .._native.errors import ContextOverflowError
from ..generation import openai
from ..generation.logprobs import CompletionLogprobs, check_completion
from .openai_routes import choices, inband_error, sse, usage_chunk
from .queue import BatchQueue, ClientGone, Reply, first_pieces, results, while_connected
from .requests import RequestError, flag, include_usage, raw_tokens, read_json, response_format, sampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def unsupported(body: dict) -> None:
    """Options this server does not implement: 400 rather than silently different output."""
    if body.get("echo"):
        raise RequestError(400, "'echo': true is not supported")
    if body.get("suffix"):
        raise RequestError(400, "'suffix' is not supported")
    if body.get("top_logprobs") is not None:
        raise RequestError(400, "'top_logprobs' is for /v1/chat/completions: here 'logprobs' is the number (0..5)")
    if body.get("logit_bias"):
        raise RequestError(400, "'logit_bias' is not supported")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise RequestError(400, "'best_of' is not supported (other than equal to 'n')")


def prompt_of(body: dict):
    """The prompt as a callable giving (tokens, images): a string, token ids, or a list of one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return lambda model: (raw_tokens(model, prompt), [])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return lambda model: (checked_tokens(prompt, model.tokenizer.n_vocab), [])
    raise RequestError(400, "'prompt' must be a non-empty string or a non-empty list of token ids (one prompt)")


def checked_tokens(tokens: list[int], n_vocab: int) -> list[int]:
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise RequestError(400, f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
    return tokens


def logprob_options(body: dict) -> dict:
    """`logprobs: k` as the model's keywords ({} when null or absent), checked (400)."""
    try:
        top = check_completion(body.get("logprobs"))
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    return {} if top is None else {"logprobs": True, "top_logprobs": top}


def options(body: dict) -> dict:
    """Sampling options (max_tokens 16 unless given, as OpenAI), response_format and logprobs."""
    return {"max_tokens": DEFAULT_MAX_TOKENS, **sampling(body), **response_format(body), **logprob_options(body)}


def register(app, queue: BatchQueue, model_id: str, limits: dict, error) -> None:
    # FastAPI reads the routes' annotations at run time: no postponed annotations in this module
    from fastapi import Request
    from fastapi.responses import Response, StreamingResponse

    @app.post("/v1/completions")
    async def completions(request: Request):
        replies = None
        try:
            body = await read_json(request, limits["max_body_bytes"])
            unsupported(body)
            prompt, opts, n = prompt_of(body), options(body), choices(body, queue.model.n_seq_max)
            stream, usage_too = flag(body, "stream"), include_usage(body)  # (checked before anything is queued)
            replies = await queue.submit(prompt, opts, n=n)
            firsts = await while_connected(request, first_pieces(replies), replies)
            cid, created = openai.text_completion_id(), openai.now()
            silent = queue.model.tokenizer.special_bytes if opts.get("skip_special_tokens", True) else frozenset()
            if not stream:
                ended = await while_connected(request, results(replies), replies)
                return openai.text_response(cid, created, model_id, ended, silent)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as exc:
            if replies:  # failed after it was queued: not generated for no one
                await replies[0].aclose()
            if isinstance(exc, ContextOverflowError):
                exc.param = "prompt"  # (this route's field; error_body says "messages" otherwise)
            return error(exc)
        logprobs = silent if "logprobs" in opts else None
        return StreamingResponse(events(replies, firsts, cid, created, model_id, usage_too, logprobs),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def events(replies: list[Reply], firsts: list, cid: str, created: int, model_id: str, include_usage: bool,
                 logprobs: frozenset[bytes] | None):
    """Each choice's chunks in turn; then usage (when asked) in a chunk without choices, as OpenAI sends it (the
    other chunks then carry "usage": null)."""
    try:
        for i, (reply, first) in enumerate(zip(replies, firsts)):
            async for line in choice_events(reply, first, i, (cid, created, model_id), logprobs, include_usage):
                yield line
        if include_usage:
            usage = openai.text_response(cid, created, model_id, [r.result for r in replies])["usage"]
            yield sse(usage_chunk(openai.text_chunk(cid, created, model_id, "", None, 0), usage))
    except Exception as exc:  # after the headers: report in-band, as OpenAI does
        yield sse(inband_error(exc))
        return
    finally:
        await replies[0].aclose()
    yield "data: [DONE]\n\n"


async def choice_events(reply: Reply, first: str | None, index: int, ids: tuple, logprobs: frozenset[bytes] | None,
                        null_usage: bool):
    """One choice's pieces (each with the logprobs of its tokens when asked: `logprobs` is then the text of the
    tokens the reply leaves out), its finish_reason last; `ids`: the response's (id, created, model)."""
    shape = CompletionLogprobs(logprobs) if logprobs is not None else None
    extra = {"usage": None} if null_usage else {}

    def chunk(text: str, finish_reason: str | None) -> str:
        items = shape.take(openai.take(reply.held)) if shape else None
        return sse({**openai.text_chunk(*ids, text, finish_reason, index, items), **extra})

    if first:
        yield chunk(first, None)
    async for piece in reply:
        yield chunk(piece, None)
    yield chunk("", reply.result.finish_reason)
