"""The tokenizer built from the GGUF vocabulary gives the same ids as tiktoken built from Meta's
tokenizer.model (llama-models wheel), on 10,000 varied strings; decode(encode(s)) == s."""

from __future__ import annotations

import random

import pytest

import mllama
from mllama.text.tokenizer import LLAMA3_PATTERN, StreamDecoder
from tiny_checkpoint import special_tokens, tokenizer_model_path

FRAGMENTS = [
    "Hello", " world", "The quick brown fox", " jumps over the lazy dog.", "It's", " we'll", " they'VE", "I'M",
    "Привет, мир", " Ελληνικά", "日本語のテキスト", "中文字符", "한국어", "مرحبا بالعالم", "हिन्दी", "ภาษาไทย", "עברית",
    "😀", "👩‍👩‍👧‍👦", "🇫🇷", "café", "naïve", "ﬁ", "Å", "\u00a0", "\u200b", "∑∫√∞", "½", "™",
    " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\n",
    "0", "42", "123456789", "3.14159", "1,000,000", "2024-11-24",
    "def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {", "<div class=\"a\">", "SELECT * FROM t;", "a_b-c.d",
    "<|eot_id|>", "<|image|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>", "<|reserved_special_token_7|>",
    "<|", "|>", "<<>>", "!!!", "???", "...", "--", "''", "\"", "(", ")", "[]", "{}", "#", "@user", "https://example.com/x?y=1",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = rng.choices(FRAGMENTS, k=rng.randint(1, 8))
        if rng.random() < 0.2:
            parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 6))))
        if rng.random() < 0.1:
            parts.append(" " * rng.randint(1, 9) + "\n" * rng.randint(0, 3))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def reference():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(tokenizer_model_path()))
    specials = {tok: 128000 + i for i, tok in enumerate(special_tokens())}
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def tokenizer(gguf_f32):
    with mllama.Model(gguf_f32) as model:
        yield model.tokenizer


def test_ten_thousand_strings_match_tiktoken(tokenizer, reference):
    strings = random_strings(10_000)
    assert len(set(strings)) > 9_000
    for s in strings:
        ids = tokenizer.encode(s)
        assert ids == reference.encode(s, disallowed_special=()), s
        assert tokenizer.decode(ids) == s


def test_special_tokens_only_where_allowed(tokenizer):
    text = "<|begin_of_text|>hi<|eot_id|>"
    assert tokenizer.encode(text, allow_special=True) == [128000, 6151, 128009]
    plain = tokenizer.encode(text)
    assert 128000 not in plain and 128009 not in plain
    assert tokenizer.decode(plain) == text
    assert tokenizer.encode("<|image|>", allow_special=True) == [128256]


def test_chat_prompt_ids_match_the_reference(gguf_f32):
    with mllama.Model(gguf_f32) as model:
        tokens, images = model.chat_prompt([{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                                         {"type": "text", "text": "Describe this image."}]}])
    assert tokens == [128000, 128006, 882, 128007, 271, 128256, 75885, 420, 2217, 13, 128009, 128006, 78191, 128007, 271]
    assert images == ["x.png"]


def test_user_text_that_looks_special_stays_text(gguf_f32):
    with mllama.Model(gguf_f32) as model:
        tokens, _ = model.chat_prompt([{"role": "user", "content": "say <|eot_id|> now"}])
    assert tokens.count(128009) == 2  # the system block's and the user turn's own, not the typed one


def test_stream_decoder_holds_back_split_characters(tokenizer):
    text = "日本語 😀 café"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_skips_special_tokens_when_asked(tokenizer):
    """What a reply shows of the special tokens a model generates: nothing (vLLM's skip_special_tokens, llama.cpp's
    server without --special), or their text; a split character across a skipped token still joins up."""
    emoji = tokenizer.encode("😀")
    ids = tokenizer.encode("Hi") + [tokenizer.token_id("<|reserved_special_token_0|>")] + emoji[:1] + \
        [tokenizer.token_id("<|python_tag|>")] + emoji[1:] + tokenizer.encode(" x")
    for skip, expected in ((True, "Hi😀 x"), (False, None)):
        decoder = StreamDecoder(tokenizer, skip_special=skip)
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        assert "".join(pieces) == (expected or tokenizer.decode(ids))
    assert "<|python_tag|>" in tokenizer.decode(ids)


def test_each_lone_surrogate_is_one_replacement_character(tokenizer):
    """JSON can carry a lone surrogate ("\\ud83d"): one U+FFFD, as a decoder of UTF-16 gives; a split pair joins."""
    assert tokenizer.encode("a\ud83db") == tokenizer.encode("a\ufffdb")
    assert tokenizer.encode("a\ud83d\ude00b") == tokenizer.encode("a😀b")
