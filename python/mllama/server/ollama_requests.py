"""What an Ollama request asks for: its options, output format, prompt (chat or generate) and the fields
Ollama refuses for this model (thinking, insert, a template of the client's), refused here the same way."""

import logging
import math
import re

from ..generation.context_fit import fit_chat
from .requests import SAMPLING_KEYS, RequestError, flag, from_ollama, number, raw_tokens, sampling

log = logging.getLogger("mllama.server")


_GO_DURATION = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h))+")


def unloads(body: dict) -> bool:
    """Whether `keep_alive` asks to unload (a zero duration), read as Ollama reads it: a string is a Go duration
    ("5m", "1h30m", "0", "-1s"), a number is seconds (truncated); anything else is a 400."""
    value = body.get("keep_alive")
    if value is None:
        return False
    if isinstance(value, str) and (value in ("0", "+0", "-0") or _GO_DURATION.fullmatch(value)):
        return not any(float(n) for n, _ in re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", value))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return int(value) == 0
    raise RequestError(400, f"'keep_alive' must be a duration (\"5m\", \"1h30m\", \"0\") or a number of seconds, "
                            f"not {value!r:.40}", param="keep_alive")


def loads_only(body: dict, key: str) -> bool:
    """A request that only loads (or unloads) the model, as Ollama's clients send it: /api/chat with no
    messages, /api/generate with no prompt (images or not: Ollama answers those with "load" too)."""
    if key == "message":
        return body.get("messages") in (None, [])
    return not body.get("prompt")


# Ollama's options that size or place the loaded model: the server's own flags decide them (README)
SERVER_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "numa", "num_keep"}
_said: set[str] = set()  # the options already logged as ignored (once each)


def options(body: dict) -> dict:
    """Sampling from Ollama's `options` (num_predict > 0 is max_tokens); the others are logged once each as
    ignored, as Ollama logs the options it does not know."""
    opts = body.get("options")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):  # ([], 0 or false too: they had been read as no options)
        raise RequestError(400, "'options' must be an object")
    n_predict = opts.get("num_predict")  # (-1, -2 or 0: no limit but the context's, as Ollama reads them)
    n_predict = None if n_predict is None else number("num_predict", n_predict, int)
    extra = {"max_tokens": n_predict} if n_predict is not None and n_predict > 0 else {}
    taken = sampling({**opts, **extra})
    for key in sorted({k for k, v in opts.items() if v is not None} - SAMPLING_KEYS - {"num_predict"} - _said):
        _said.add(key)
        why = "the server's own flags set it (mllama serve --help)" if key in SERVER_OPTIONS else "not done by mllama"
        log.warning("Ollama option %r ignored: %s", key, why)
    return taken


def output_format(body: dict) -> dict:
    """Ollama's `format` ("json" or a JSON schema object) as the model's response_format keyword;
    the model compiles and checks the schema (ValueError: 400)."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise RequestError(400, "'format' must be \"json\" or a JSON schema object")


def refuse_unsupported(body: dict, model_id: str) -> None:
    """400 for what Ollama itself refuses for this model (with its messages), and for what mllama cannot do
    that Ollama would: better said than silently ignored."""
    if flag(body, "raw") and (body.get("system") or body.get("template") or body.get("context")):
        raise RequestError(400, "raw mode does not support template, system, or context")
    if body.get("think") not in (None, False):
        raise RequestError(400, f'"{model_id}" does not support thinking')
    if body.get("suffix"):
        raise RequestError(400, f'"{model_id}" does not support insert')
    if body.get("template"):
        raise RequestError(400, "'template' is not supported: mllama renders the model's own chat template "
                                "(send \"raw\": true with a prompt written in full instead)")
    if body.get("context"):
        raise RequestError(400, "'context' (deprecated by Ollama) is not supported: send the conversation to /api/chat")


def truncates(body: dict) -> bool:
    """Ollama's `truncate` (default true): a chat history too long for the context leaves out its oldest
    messages. (`shift`, Ollama's context shift while it generates, is read but not done: a reply that fills
    the context ends with done_reason "length".)"""
    flag(body, "shift")
    return flag(body, "truncate", True)


def chat_prompt(messages: list[dict], tools, truncate: bool, max_tokens):
    """The prompt of /api/chat for the queue: the messages fitted to the context unless truncate is false
    (messages left out are logged, as Ollama does); a system prompt next to images as Ollama writes it; a last
    assistant message continued, as Ollama's template leaves it open (clients' "continue response")."""
    render = {"tools": tools, "system_with_images": True,
              "continue_final": messages[-1].get("role") == "assistant" and not messages[-1].get("tool_calls")}

    def prompt(model):
        if not truncate:
            return model.chat_prompt(messages, within_context=True, **render)
        fitted = fit_chat(model, messages, max_tokens=max_tokens, **render)
        if fitted.n_left_out and len(fitted.tokens) <= model.n_ctx:  # (a prompt still over it fails: no cut)
            log.warning("left out the %d oldest of %d messages to fit the context (%d tokens)",
                        fitted.n_left_out, len(messages), model.n_ctx)
        return fitted.tokens, fitted.images
    return prompt


def generate_prompt(body: dict):
    """The prompt of /api/generate: the chat template around prompt, system and images, or with
    "raw": true the prompt as it is (special tokens allowed)."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt' must be a string")
    images = from_ollama({"images": body.get("images") or []}).get("images", [])
    if flag(body, "raw"):  # ("false" had been read as true: the prompt lost its template)
        return lambda model: (raw_tokens(model, prompt), images)
    if not isinstance(body.get("system") or "", str):
        raise RequestError(400, "'system' must be a string")
    messages = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    messages.append({"role": "user", "content": prompt, "images": images})
    return lambda model: model.chat_prompt(messages, system_with_images=True, within_context=True)
