"""The tokenizer of a Hugging Face folder as GGUF metadata: GPT-2 style tokens, token types and
merges (llama.cpp's `gpt2` model with the `llama-bpe` pre-tokenizer), plus the special ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .._native.errors import ConversionError

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerData:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # content -> id
    chat_template: str | None = None
    add_bos: bool = False

    def id_of(self, content: str) -> int | None:
        return self.special.get(content)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges", []):
        out.append(m if isinstance(m, str) else " ".join(m))
    return out


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    """The checkpoint's template, as transformers picks it: chat_template.jinja first (it "clobbers any template in
    the config"), then tokenizer_config.json's, then the processor's chat_template.json."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    if template:
        return template
    if (folder / "chat_template.json").exists():
        return _read_json(folder / "chat_template.json").get("chat_template")
    return None


def read_tokenizer(folder: Path) -> TokenizerData:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ConversionError(f"{folder} has no tokenizer.json")
    data = _read_json(path)
    model = data.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{path}: expected a byte-level BPE tokenizer")
    vocab: dict[str, int] = dict(model["vocab"])
    special: dict[str, int] = {}
    user_defined: set[int] = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special", False):
            special[added["content"]] = added["id"]
        else:
            user_defined.add(added["id"])
    n_tokens = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n_tokens)]
    types = [UNUSED] * n_tokens
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = CONTROL if content in special else USER_DEFINED if i in user_defined else NORMAL
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.exists() else {}
    return TokenizerData(
        tokens=tokens,
        token_types=types,
        merges=_merges(model),
        special=special,
        chat_template=_chat_template(folder, tok_config),
        add_bos=bool(tok_config.get("add_bos_token", False)),
    )
