"""Constrained decoding (structured output) with llguidance: a request's JSON schema, JSON-object mode,
Lark grammar or regex becomes a mask of the tokens allowed next, applied to the logits before sampling.

Three objects, from the longest-lived to the shortest:
- GrammarVocabulary: llguidance's view of one model's vocabulary (byte-level BPE from the GGUF tokens,
  the end-of-generation ids, the logits' width, `<|image|>` forbidden); one per model, immutable.
- Grammar: one compiled constraint, immutable and shareable by any number of generations.
- GrammarState: one generation's position in its grammar (mutable, private to that sequence):
  `allowed_tokens()` for the next token, then `advance(token)` with the token sampled; `prefetch(pool)`
  starts the next mask on a worker thread (llguidance drops the GIL), so that it is computed while the
  model decodes and allowed_tokens only collects it (the batch scheduler does this).

What callers pass (`Grammar.resolve`):
- response_format (OpenAI's): {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
  object), {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}
  (the server turns Ollama's `format`, "json" or a JSON schema object, into one of these);
- grammar: Lark text (llguidance's dialect: regexes as /.../, JSON schemas inside with %json), or
  {"lark": text} or {"regex": pattern}, or an already compiled Grammar.
JSON comes out on one line with ", " and ": " between items (no free whitespace: a model cannot pad
it forever); a schema's "x-guidance" object overrides that (llguidance's JSON options). With strict
true, a schema keyword llguidance cannot enforce is an error; otherwise it is ignored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future, wait
from functools import cached_property
from typing import Iterable

import llguidance
import numpy as np
from llguidance.tiktoken import lltokenizer_from_encoding

from .._native.errors import MllamaError
from ..text.tokenizer import Tokenizer

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarVocabulary:
    """The tokens of one model as llguidance sees them. The llguidance tokenizer (0.5-1.5 s for the
    128K vocabulary) is built on first use; the Model keeps one of these, and with it the grammars compiled last
    (`compiled`: the same schema in request after request is compiled once)."""

    N_COMPILED = 32  # compiled grammars kept, the most recently used (a server sees the same schemas again)

    def __init__(self, tokenizer: Tokenizer, eog_ids: Iterable[int], n_logits: int, forbidden: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self._compiled: OrderedDict[tuple[str, str], Grammar] = OrderedDict()  # (kind, llguidance text) -> Grammar
        self._compiled_lock = threading.Lock()
        self.eog_ids = tuple(sorted(eog_ids))
        self.n_logits = n_logits  # the width of the logits the masks apply to
        self.forbidden = np.array(sorted(i for i in forbidden if 0 <= i < n_logits), dtype=np.int64)

    @cached_property
    def llg(self) -> llguidance.LLTokenizer:
        return lltokenizer_from_encoding(self.tokenizer.encoding, n_vocab=self.tokenizer.n_vocab,
                                         eos_token=list(self.eog_ids))

    def compiled(self, llg_grammar: str, kind: str) -> "Grammar":
        """The Grammar of llguidance's grammar text: compiled once, then shared (it is immutable)."""
        key = (kind, llg_grammar)
        with self._compiled_lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        grammar = Grammar(self, llg_grammar, kind)
        with self._compiled_lock:
            self._compiled[key] = grammar
            while len(self._compiled) > self.N_COMPILED:
                self._compiled.popitem(last=False)
        return grammar

    @property
    def mask_words(self) -> int:
        """32-bit words of one llguidance token bitmask."""
        return (self.llg.vocab_size + 31) // 32


class Grammar:
    """A compiled constraint. Immutable: each generation starts its own GrammarState from it."""

    def __init__(self, vocabulary: GrammarVocabulary, llg_grammar: str, kind: str):
        try:
            matcher = llguidance.LLMatcher(vocabulary.llg, llg_grammar, log_level=0)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"invalid {kind}: {exc}") from None
        if matcher.is_error():
            raise ValueError(f"invalid {kind}: {_llg_error(matcher)}")
        try:  # a grammar that admits no text at all ({"$ref": "#"}) is refused here, not at the first token
            GrammarState(matcher.deep_copy(), vocabulary).mask_now()
        except ValueError as exc:
            raise ValueError(f"invalid {kind}: it admits no text this model can generate ({exc})") from None
        self.vocabulary, self.kind = vocabulary, kind
        self._initial = matcher  # never advanced: only copied

    def start(self) -> "GrammarState":
        """A fresh state at the grammar's beginning, for one generation."""
        return GrammarState(self._initial.deep_copy(), self.vocabulary)

    def __repr__(self) -> str:
        return f"<mllama.Grammar {self.kind}>"

    # --- building one from what callers pass ------------------------------------------------
    @classmethod
    def json_schema(cls, vocabulary: GrammarVocabulary, schema, *, strict: bool = True) -> "Grammar":
        """JSON that validates against `schema` (a dict, or True for any JSON value)."""
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object")
        try:
            options = {**JSON_LAYOUT, "lenient": not strict}
            schema = {} if schema is True else schema  # any JSON value: llguidance takes the empty schema for it
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid JSON schema: {exc}") from None
        return vocabulary.compiled(text, "JSON schema")

    @classmethod
    def lark(cls, vocabulary: GrammarVocabulary, text: str) -> "Grammar":
        _require_text(text, "a Lark grammar")
        return vocabulary.compiled(llguidance.LLMatcher.grammar_from_lark(text), "Lark grammar")

    @classmethod
    def regex(cls, vocabulary: GrammarVocabulary, pattern: str) -> "Grammar":
        _require_text(pattern, "a regex")
        return vocabulary.compiled(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def from_response_format(cls, vocabulary: GrammarVocabulary, response_format) -> "Grammar | None":
        """OpenAI's response_format: text (None), json_object or json_schema."""
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_schema(vocabulary, ANY_JSON_OBJECT)
        if kind != "json_schema":
            raise ValueError("response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        strict = spec.get("strict", False)
        if strict is not None and not isinstance(strict, bool):  # ("false" had been read as true)
            raise ValueError(f"response_format's json_schema.strict must be true or false, not {strict!r:.40}")
        return cls.json_schema(vocabulary, spec["schema"], strict=bool(strict))

    @classmethod
    def from_grammar(cls, vocabulary: GrammarVocabulary, grammar) -> "Grammar":
        """Lark text, {"lark": text}, {"regex": pattern}, or a Grammar compiled for this vocabulary."""
        if isinstance(grammar, Grammar):
            if grammar.vocabulary is not vocabulary:
                raise ValueError("this Grammar was compiled for another model")
            return grammar
        if isinstance(grammar, str):
            return cls.lark(vocabulary, grammar)
        if isinstance(grammar, dict) and len(grammar) == 1 and "lark" in grammar:
            return cls.lark(vocabulary, grammar["lark"])
        if isinstance(grammar, dict) and len(grammar) == 1 and "regex" in grammar:
            return cls.regex(vocabulary, grammar["regex"])
        raise ValueError("grammar must be Lark text, {'lark': text}, {'regex': pattern} or a Grammar")

    @classmethod
    def resolve(cls, vocabulary: GrammarVocabulary, *, grammar=None, response_format=None) -> "Grammar | None":
        """The one constraint of a request (None: unconstrained); both at once is an error."""
        from_format = cls.from_response_format(vocabulary, response_format)
        if grammar is None:
            return from_format
        if from_format is not None:
            raise ValueError("give either response_format or grammar, not both")
        return cls.from_grammar(vocabulary, grammar)


class GrammarState:
    """Where one generation is in its grammar. The mask (allowed_tokens) and the step (advance) are
    separate calls: llguidance computes the mask without holding the GIL, so it can run in another
    thread while the model decodes."""

    def __init__(self, matcher: llguidance.LLMatcher, vocabulary: GrammarVocabulary):
        self._matcher, self._vocabulary = matcher, vocabulary
        self._bits = np.zeros(vocabulary.mask_words, dtype=np.int32)
        self._pending: Future | None = None  # the next mask, computing on a worker thread (prefetch)

    def prefetch(self, pool: Executor) -> None:
        """Start computing the next mask in `pool`; allowed_tokens() then waits for it and returns it
        (its errors included). Nothing else may touch this state's matcher meanwhile: the other methods
        wait for the mask first."""
        if self._pending is None:
            self._pending = pool.submit(self._compute_mask)

    def allowed_tokens(self) -> np.ndarray:
        """Which tokens may come next: a bool array as wide as the logits. End-of-generation ids only
        where the grammar is satisfied (and nothing else once it is complete); `<|image|>` never."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else self._compute_mask()

    def _compute_mask(self) -> np.ndarray:  # (where a decode's masks are computed: in line, or on the pool)
        return self.mask_now()

    def mask_now(self) -> np.ndarray:
        """The next mask, computed on this thread (the compile's check of the first one calls it directly)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._raise_on_error()
        n = self._vocabulary.n_logits
        allowed = np.unpackbits(self._bits.view(np.uint8), count=min(n, self._bits.size * 32), bitorder="little")
        allowed = np.pad(allowed, (0, n - allowed.size)).view(bool)
        allowed[self._vocabulary.forbidden] = False
        if not allowed.any():  # a grammar that asks for <|image|>, say
            raise ValueError("the grammar allows no token that this model can generate here")
        return allowed

    def advance(self, token: int) -> None:
        """Move past the token sampled (one that allowed_tokens allowed)."""
        self._settle()
        self._pending = None  # a mask computed before this token no longer applies
        if not self._matcher.consume_token(int(token)):
            if self._matcher.is_error():  # the grammar hit one of llguidance's limits: the request's, not ours
                raise ValueError(f"constrained decoding failed: {_llg_error(self._matcher)}")
            raise MllamaError(f"token {token} does not fit the grammar: {_llg_error(self._matcher)}")

    def is_accepting(self) -> bool:
        """The text so far is a complete match (end-of-generation is allowed now)."""
        self._settle()
        return self._matcher.is_accepting()

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-generation can follow."""
        self._settle()
        return self._matcher.is_stopped()

    def _settle(self) -> None:
        """Wait until a prefetched mask has been computed (it keeps its result for allowed_tokens)."""
        if self._pending is not None:
            wait([self._pending])

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():  # the grammar hit one of llguidance's limits (too complex)
            raise ValueError(f"constrained decoding failed: {_llg_error(self._matcher)}")


def _llg_error(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error without the parser state and grammar it appends (a page of internals)."""
    return matcher.get_error().split("<state>")[0].strip() or "llguidance stopped"


def _require_text(value, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")


__all__ = ["Grammar", "GrammarState", "GrammarVocabulary"]
