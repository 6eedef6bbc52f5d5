"""Micro model files (a 300-token vocabulary, ~1 MB) for fuzzing: our format and Ollama's, made
from the tiny fixture's conversions so every loader path is reachable quickly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_VOCAB = 300
TOKENIZER_KEYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template"}


def shrink(src: Path, dst: Path) -> Path:
    from gguf import GGUFReader
    from gguf_edit import rewrite

    keys = {"mllama.vocab_size": N_VOCAB, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 0}
    fields = GGUFReader(src).fields
    for key, value in (("mllama.image_token_id", N_VOCAB), ("tokenizer.ggml.eot_token_id", 2), ("tokenizer.ggml.eom_token_id", 3)):
        if key in fields:
            keys[key] = value

    def slice_vocab(name, data, ttype):
        if name == "token_embd.weight":
            return np.ascontiguousarray(data[: N_VOCAB + 8]), ttype
        if name == "output.weight":
            return np.ascontiguousarray(data[:N_VOCAB]), ttype
        return data, ttype

    return rewrite(src, dst, keys=keys, drop_keys=TOKENIZER_KEYS, tensor_fn=slice_vocab)
