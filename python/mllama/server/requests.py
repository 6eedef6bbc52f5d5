"""Reading and checking request bodies: size limits, JSON, messages, sampling options, and the HTTP
status each error maps to. Free of FastAPI, so it is testable on its own."""

from __future__ import annotations

import base64
import json
import logging

from .._native.errors import ContextOverflowError, GenerationCancelled, ImageError, TemplateError
from .._native.ffi import is_backend_error
from ..generation.logprobs import check as check_logprobs

log = logging.getLogger("mllama.server")

SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "repeat_penalty", "repeat_last_n", "skip_special_tokens"}
NUMBER_KEYS = (("temperature", float), ("top_p", float), ("min_p", float), ("presence_penalty", float),
               ("frequency_penalty", float), ("repeat_penalty", float), ("max_tokens", int), ("top_k", int), ("seed", int),
               ("repeat_last_n", int))


class RequestError(Exception):
    """An HTTP error: status, message, headers, and OpenAI's `param` (the field at fault) and `code` where known."""

    def __init__(self, status: int, message: str, headers: dict | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.param, self.code = param, code


def sampling(body: dict) -> dict:
    """The sampling options of an OpenAI-style body (or Ollama's `options`), type- and range-checked (the ranges
    the sampler cannot honour are SamplingParams' own checks, which give 400 too)."""
    out = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    if "max_completion_tokens" in out:
        out["max_tokens"] = out.pop("max_completion_tokens")
    for key, kind in NUMBER_KEYS:
        if key in out:
            out[key] = number(key, out[key], kind)
    if out.get("seed") == -1:  # llama.cpp's and Ollama's "no seed": a random one
        del out["seed"]
    stop = out.get("stop", "")
    if not isinstance(stop, str) and not (isinstance(stop, list) and all(isinstance(t, str) for t in stop)):
        raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
    if not isinstance(out.get("skip_special_tokens", True), bool):  # vLLM's option (default true)
        raise RequestError(400, "'skip_special_tokens' must be true or false", param="skip_special_tokens")
    if "max_tokens" in out and out["max_tokens"] < 1:
        raise RequestError(400, "'max_tokens' must be at least 1", param="max_tokens")
    if out.get("temperature", 0.0) < 0.0:  # the Python API reads a negative temperature as greedy; the APIs refuse it
        raise RequestError(400, "'temperature' must be >= 0", param="temperature")
    return out


def number(key: str, value, kind: type = float) -> int | float:
    """A numeric field as `kind` (int: a whole float such as 2.0 too, as JSON numbers reach Go servers); 400 else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{key}' must be a number", param=key)
    if kind is int and not float(value).is_integer():
        raise RequestError(400, f"'{key}' must be an integer, not {value}", param=key)
    return kind(value)


def flag(body: dict, key: str, default: bool = False) -> bool:
    """A true/false field (absent or null: default); any other value is a 400, not read as its truthiness."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be true or false", param=key)
    return value


def include_usage(body: dict) -> bool:
    """OpenAI's stream_options.include_usage (checked before anything is queued)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return flag(options, "include_usage")


def raw_tokens(model, text: str) -> list[int]:
    """A raw prompt's tokens (special-token strings count) after a BOS unless it starts with one: as llama.cpp's
    server, vLLM and Ollama's raw mode read a completion prompt."""
    model.check_prompt_length([text])  # (before tokenizing: a huge one takes a minute)
    tokens = model.tokenize(text, special=True)
    bos = model.hparams.bos_token_id
    return tokens if tokens[:1] == [bos] else [bos, *tokens]


def response_format(body: dict) -> dict:
    """OpenAI's `response_format` as the model's keyword ({} when absent); the model compiles and checks
    the schema itself (ValueError: 400)."""
    value = body.get("response_format")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, "'response_format' must be an object")
    return {"response_format": value}


def logprob_options(body: dict) -> dict:
    """OpenAI's `logprobs` and `top_logprobs` as the model's keywords ({} when off), checked (400)."""
    try:
        top = check_logprobs(body.get("logprobs"), body.get("top_logprobs"))
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    return {} if top is None else {"logprobs": True, "top_logprobs": top}


def check_messages(body: dict, allow_local_images: bool, base64_images: bool = False) -> list[dict]:
    """The request's messages; no image of them names a file of this machine unless allow_local_images (an
    `image_url` that is not a data: URL, a part of the Python API's "image" type, an `images` entry: except on
    the Ollama routes, base64_images, where `images` are base64 data, decoded by from_ollama)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict):
            raise RequestError(400, "each message must be an object")
        if m.get("images") and not (allow_local_images or base64_images):
            raise RequestError(400, "'images' is Ollama's field (its routes: /api/chat); here, use image_url parts "
                                    "with data: URLs", param="messages")
        content = m.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image" and not allow_local_images:
                raise RequestError(400, "content parts of type 'image' are not part of the API: use image_url "
                                        "parts with data: URLs", param="messages")
            if isinstance(part, dict) and part.get("type") == "image_url":
                image_url = part.get("image_url", "")
                url = image_url.get("url", "") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise RequestError(400, "an image_url's url must be a string", param="messages")
                if not url.startswith("data:") and not allow_local_images:
                    raise RequestError(400, "image_url must be a data: URL (local paths need --allow-local-images)")
    return messages


def from_ollama(message: dict) -> dict:
    """An Ollama message: its `images` are base64 strings."""
    images = message.get("images") or []
    if not images:
        return message
    decoded = []
    for image in images:
        try:
            if isinstance(image, str):  # line breaks, as Go's decoder (Ollama's) ignores them
                image = image.replace("\r", "").replace("\n", "")
            decoded.append(base64.b64decode(image, validate=True))
        except (ValueError, TypeError):
            raise RequestError(400, "images must be base64 strings") from None
    return {**message, "images": decoded}


async def read_json(request, max_body_bytes: int) -> dict:
    """The body of a request as a JSON object, at most max_body_bytes long (413 past that)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        raise RequestError(413, f"request body over {max_body_bytes} bytes")
    body = bytearray()  # (appended in place: bytes += would copy the whole body for every chunk)
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise RequestError(413, f"request body over {max_body_bytes} bytes")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:  # a schema nested thousands deep, say
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except ValueError:  # (Python's limit on an integer's digits: its message named sys.set_int_max_str_digits)
        raise RequestError(400, "malformed JSON: a number too long") from None
    if not isinstance(value, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return value


def error_status(exc: BaseException) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, (ImageError, TemplateError, ContextOverflowError, ValueError, TypeError, KeyError)):
        return 400
    if isinstance(exc, GenerationCancelled):
        return 503  # stopped by the server (shutting down): no client's fault, nor an internal error
    if is_backend_error(exc):
        return 503  # a lost RPC worker or a failed device: the server cannot answer until it is restarted
    return 500


def error_body(exc: BaseException) -> tuple[int, dict, dict]:
    """(status, OpenAI's error body, headers) for an exception; internal errors are not detailed. `code` is
    OpenAI's where one applies ("context_length_exceeded": clients such as LiteLLM and LangChain read it)."""
    status = error_status(exc)
    message = exc.message if isinstance(exc, RequestError) else str(exc) if status != 500 else "internal error"
    if status == 500:  # not detailed to the client: in the server's log
        log.error("internal error: %s: %s", type(exc).__name__, exc)
    headers = exc.headers if isinstance(exc, RequestError) else {}
    kind = "invalid_request_error" if status < 500 else "server_error"
    param = getattr(exc, "param", None)  # a RequestError's, or one a route set (ContextOverflowError: "prompt")
    code = exc.code if isinstance(exc, RequestError) else None
    if isinstance(exc, ContextOverflowError):  # (too many images is no token overflow: trimming text won't help)
        param, code = param or "messages", "context_length_exceeded" if exc.limit == "tokens" else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers


def ollama_error_body(exc: BaseException) -> tuple[int, dict, dict]:
    """error_body in Ollama's shape: {"error": "<message>"}."""
    status, body, headers = error_body(exc)
    return status, {"error": body["error"]["message"]}, headers
