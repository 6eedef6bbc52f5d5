"""Byte-level BPE for the Llama 3 vocabulary, built from the GGUF vocabulary.

The engine is tiktoken (fast, well kept): for Llama 3's vocabulary a token's id is its BPE merge
rank, so the mergeable ranks are rebuilt from the GGUF tokens (GPT-2 byte-to-unicode mapping
undone) and the control tokens become tiktoken special tokens. Special tokens are recognized only
where allowed: text a user types (including the literal string "<|eot_id|>") is ordinary text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import tiktoken

# The Llama 3 pre-tokenizer (llama.cpp's `llama-bpe`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PATTERNS = {"llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    def __init__(self, tokens: list[str], token_types: list[int], pre: str = "llama-bpe"):
        if pre not in PATTERNS:
            raise ValueError(f"unsupported pre-tokenizer '{pre}'")
        decoder = _byte_decoder()
        ranks: dict[bytes, int] = {}
        special: dict[str, int] = {}
        for i, (tok, typ) in enumerate(zip(tokens, token_types)):
            if typ in (CONTROL, USER_DEFINED):
                special[tok] = i
            elif typ != UNUSED:
                ranks[bytes(decoder[ch] for ch in tok)] = i
        self.n_vocab = len(tokens)
        self.special = special
        self._enc = tiktoken.Encoding("mllama", pat_str=PATTERNS[pre], mergeable_ranks=ranks, special_tokens=special)
        self._id_bytes = {i: tok.encode() for tok, i in special.items()}
        self.special_ids = frozenset(special.values())
        self.special_bytes = frozenset(self._id_bytes.values())  # their text
        self.max_token_bytes = max(map(len, [*ranks, *self.special_bytes]))

    def at_least(self, texts: Iterable[str]) -> int:
        """A lower bound of the tokens of `texts` encoded one by one, from their lengths alone: no token spans
        more than max_token_bytes bytes, no character fewer than one byte (no tokenizing: a 30 MiB prompt is
        known to be over a context at once, where tokenizing it takes a minute)."""
        return sum(-(-len(text) // self.max_token_bytes) for text in texts)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings are ordinary text unless allow_special.
        Lone surrogates (text that was never valid UTF-8) become U+FFFD."""
        if not text.isascii():  # (UTF-16 pairs split surrogates up again; each lone one is one U+FFFD)
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, disallowed_special=())

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding behind this tokenizer (its ranks are the token ids; control tokens are special)."""
        return self._enc

    def token_id(self, text: str) -> int:
        return self.special[text]

    def token_bytes(self, token: int) -> bytes:
        if token in self._id_bytes:
            return self._id_bytes[token]
        return self._enc.decode_single_token_bytes(token)

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns tokens into text as they come, holding back an incomplete UTF-8 character. With skip_special,
    special tokens (<|python_tag|>, reserved ones, ...) give no text: a reply shows what the model wrote
    (vLLM's skip_special_tokens, llama.cpp's server without --special)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.pending = b""
        self.skipped = tokenizer.special_ids if skip_special else frozenset()

    def skips(self, token: int) -> bool:
        return token in self.skipped

    def push(self, token: int) -> str:
        if token in self.skipped:
            return ""
        self.pending += self.tokenizer.token_bytes(token)
        cut = _complete_prefix(self.pending)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self.pending = self.pending, b""
        return text.decode("utf-8", errors="replace")


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix that does not end inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return len(data) - back if need > back else len(data)
    return len(data)
