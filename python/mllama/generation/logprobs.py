"""Log-probabilities of sampled tokens, in OpenAI's shape. They are the log-softmax of the model's raw
logits at that step (before penalties, the grammar's mask, top-k/top-p/min-p and temperature: the
model's own distribution, as OpenAI reports it). Computed only for requests that ask (~0.5 ms a token
over the 128K vocabulary)."""

from __future__ import annotations

import numpy as np

MAX_TOP_LOGPROBS = 20


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
