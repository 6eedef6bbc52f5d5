"""Log-probabilities of sampled tokens, in OpenAI's shape. They are the log-softmax of the model's raw
logits at that step (before penalties, the grammar's mask, top-k/top-p/min-p and temperature: the
model's own distribution, as OpenAI reports it). Computed only for requests that ask (~0.5 ms a token
over the 128K vocabulary).

/v1/completions (OpenAI's legacy text completions) takes `logprobs: k` (0..5) and answers in that
endpoint's shape, built from the same items (CompletionLogprobs): `tokens`, `token_logprobs`,
`top_logprobs` (per token a dict of the k most likely tokens, and the sampled one when it is not among
them, as OpenAI documents: up to k + 1 entries) and `text_offset` (where each token starts in the
choice's text, in characters). A token whose bytes are not UTF-8 on their own (part of a character) is
written "bytes:\\xNN...", as OpenAI does, so that no two tokens share a name."""

from __future__ import annotations

import codecs

import numpy as np

MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


def check(logprobs, top_logprobs) -> int | None:
    """OpenAI's `logprobs` (bool) and `top_logprobs` (0..20, needs logprobs) as the number of
    alternatives to report per token, or None when log-probabilities are off. Bad values: ValueError."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ValueError("'logprobs' must be a boolean")
    if top_logprobs is None:
        return 0 if logprobs else None
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    if not logprobs:
        raise ValueError("'top_logprobs' needs 'logprobs': true")
    return top_logprobs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def token_entry(tokenizer, token: int, logprob: float) -> dict:
    data = tokenizer.token_bytes(token)
    return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}


def entry(logits: np.ndarray, token: int, top: int, tokenizer) -> dict:
    """OpenAI's logprobs item for `token` drawn from `logits`, with the `top` most likely tokens."""
    lp = log_softmax(logits)
    out = token_entry(tokenizer, token, float(lp[token]))
    ids = np.argpartition(-lp, top - 1)[:top] if top else np.empty(0, np.int64)
    ids = ids[np.argsort(-lp[ids], kind="stable")]
    out["top_logprobs"] = [token_entry(tokenizer, int(i), float(lp[i])) for i in ids]
    return out


def check_completion(logprobs) -> int | None:
    """/v1/completions' `logprobs`: how many alternatives per token (0..5), or None (off). Bad: ValueError."""
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ValueError(f"'logprobs' must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} (or null)")
    return logprobs


def completion_token(data: bytes) -> str:
    """A token's name in the legacy shape: its text, or "bytes:\\xNN..." when its bytes are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class CompletionLogprobs:
    """One choice's logprobs in /v1/completions' shape, made from its items as they come (whole, or a
    chunk's tokens at a time): the text offset runs on from one call to the next, over the tokens' text
    that is in the reply (not that of `silent` tokens)."""

    def __init__(self, silent: frozenset[bytes] = frozenset()):
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0  # characters of the choice's text before the next token
        self._silent = silent  # the text of tokens that give none (special tokens, skip_special_tokens)

    def take(self, items: list[dict]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for item in items:
            data = bytes(item["bytes"])
            name = completion_token(data)
            top = {completion_token(bytes(t["bytes"])): t["logprob"] for t in item["top_logprobs"]}
            top.setdefault(name, item["logprob"])  # the sampled token, always (least likely when added here)
            out["tokens"].append(name)
            out["token_logprobs"].append(item["logprob"])
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            if data not in self._silent:
                self._offset += len(self._text.decode(data))  # a split character counts once it is whole
        return out
