"""Test helper: re-create Ollama's converter output (Ollama's convert/convert_mllama.go) from the
tiny HF fixture, for both generations: era B (one file, 0.7.1+) and era A (text file + projector,
0.4-0.6). Names, gate conventions (tanh / 1 - tanh), RoPE-style q/k permutes (self- and
cross-attention, norms untouched), era-A projector names with the fc1/fc2 swap, llama3 factors in
rope_freqs, no preprocessor keys, and Ollama's dtype rules (text linears quantized when asked,
v.* and mm.* kept F16/F32)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from mllama._native import dtypes

TEXT = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
TEXT_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "cross_attn.q_proj.weight": "cross_attn_q_proj.weight", "cross_attn.k_proj.weight": "cross_attn_k_proj.weight",
    "cross_attn.v_proj.weight": "cross_attn_v_proj.weight", "cross_attn.o_proj.weight": "cross_attn_o_proj.weight",
    "cross_attn.q_norm.weight": "cross_attn_q_norm.weight", "cross_attn.k_norm.weight": "cross_attn_k_norm.weight",
    "cross_attn_attn_gate": "cross_attn_attn_gate", "cross_attn_mlp_gate": "cross_attn_mlp_gate",
}
VISION = {
    "class_embedding": "v.class_embd", "patch_embedding.weight": "v.patch_embd.weight",
    "gated_positional_embedding.embedding": "v.position_embd.weight",
    "gated_positional_embedding.tile_embedding.weight": "v.tile_position_embd.weight",
    "pre_tile_positional_embedding.embedding.weight": "v.pre_tile_position_embd.weight",
    "post_tile_positional_embedding.embedding.weight": "v.post_tile_position_embd.weight",
    "layernorm_pre.weight": "v.pre_ln.weight", "layernorm_pre.bias": "v.pre_ln.bias",
    "layernorm_post.weight": "v.post_ln.weight", "layernorm_post.bias": "v.post_ln.bias",
}
VISION_LAYER_B = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
VISION_LAYER_A = {**VISION_LAYER_B, "input_layernorm": "ln1", "post_attention_layernorm": "ln2",
                  "self_attn.o_proj": "attn_out", "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGML q/k permute (rotate_half order -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(head_dim: int, base: float, factor=8.0, low=1.0, high=4.0, orig=8192) -> np.ndarray:
    out = []
    for i in range(head_dim // 2):
        inv = 1.0 / base ** (2 * i / head_dim)
        wl = 2 * math.pi / inv
        if wl < orig / high:
            out.append(1.0)
        elif wl > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _tensors(hf: dict, cfg: dict, era: str, permute_norms: bool) -> tuple[dict, dict]:
    """(text tensors, vision+projector tensors), GGUF name -> float32 array (numpy order)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    n_head, n_kv, vh = t["num_attention_heads"], t["num_key_value_heads"], v["attention_heads"]
    text, vision = {}, {}
    for name, w in hf.items():
        w = w.astype(np.float32)
        if name == "language_model.lm_head.weight":
            text["output.weight"] = w
        elif name.startswith("language_model.model."):
            rest = name[len("language_model.model."):]
            if rest in TEXT:
                text[TEXT[rest]] = w
                continue
            _, layer, sub = rest.split(".", 2)
            if "q_proj" in sub:
                w = rope_permute(w, n_head)
            elif "k_proj" in sub:
                w = rope_permute(w, n_kv)
            elif permute_norms and sub.endswith(("q_norm.weight", "k_norm.weight")):
                w = rope_permute(w, 1)
            text[f"blk.{layer}.{TEXT_LAYER[sub]}"] = w
        elif name.startswith("multi_modal_projector."):
            vision["mm.0." + name.split(".")[-1]] = w
        else:
            rest = name[len("vision_model."):]
            if rest in VISION:
                vision[VISION[rest]] = w
            elif rest == "gated_positional_embedding.gate":
                vision["v.position_embd.gate"] = 1 - np.tanh(w)
                vision["v.tile_position_embd.gate"] = np.tanh(w)
            elif rest.endswith("_tile_positional_embedding.gate"):
                vision[f"v.{rest.split('_')[0]}_tile_position_embd.gate"] = np.tanh(w)
            else:
                block, _, layer, sub = rest.split(".", 3)
                prefix = "v.blk" if block == "transformer" else "v.global.blk"
                if sub in ("gate_attn", "gate_ffn"):
                    vision[f"{prefix}.{layer}.{sub[5:]}_gate"] = np.tanh(w)
                    continue
                module, leaf = sub.rsplit(".", 1)
                if module in ("self_attn.q_proj", "self_attn.k_proj"):
                    w = rope_permute(w, vh)  # vision heads swapped: cancels in q.k
                table = VISION_LAYER_A if era == "A" else VISION_LAYER_B
                vision[f"{prefix}.{layer}.{table[module]}.{leaf}"] = w
    text["rope_freqs.weight"] = llama3_factors(t["hidden_size"] // n_head, t.get("rope_theta", 500000.0))
    return text, vision


def _text_keys(w: GGUFWriter, cfg: dict, tok: dict) -> None:
    t = cfg["text_config"]
    w.add_uint32("mllama.vocab_size", t["vocab_size"])
    w.add_uint32("mllama.block_count", t["num_hidden_layers"])
    w.add_uint32("mllama.context_length", t["max_position_embeddings"])
    w.add_uint32("mllama.embedding_length", t["hidden_size"])
    w.add_uint32("mllama.feed_forward_length", t["intermediate_size"])
    w.add_uint32("mllama.attention.head_count", t["num_attention_heads"])
    w.add_uint32("mllama.attention.head_count_kv", t["num_key_value_heads"])
    w.add_float32("mllama.attention.layer_norm_rms_epsilon", t["rms_norm_eps"])
    w.add_uint32("mllama.rope.dimension_count", t["hidden_size"] // t["num_attention_heads"])
    w.add_float32("mllama.rope.freq_base", 500000.0)
    w.add_array("mllama.attention.cross_attention_layers", t["cross_attention_layers"])
    if tok is None:  # a file without a tokenizer (fuzzing corpus)
        w.add_uint32("tokenizer.ggml.bos_token_id", 128000)
        w.add_uint32("tokenizer.ggml.eos_token_id", 128009)
        w.add_uint32("tokenizer.ggml.padding_token_id", 128004)
        return
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "llama-bpe")
    w.add_array("tokenizer.ggml.tokens", tok["tokens"])
    w.add_key_value("tokenizer.ggml.token_type", tok["types"], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", tok["merges"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 128000)
    w.add_uint32("tokenizer.ggml.eos_token_id", 128009)
    w.add_uint32("tokenizer.ggml.padding_token_id", 128004)
    w.add_array("tokenizer.ggml.eos_token_ids", [128001, 128008, 128009])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.chat_template", tok["template"])


def _vision_keys(w: GGUFWriter, cfg: dict, projection: bool) -> None:
    v = cfg["vision_config"]
    w.add_uint32("mllama.vision.block_count", v["num_hidden_layers"])
    w.add_uint32("mllama.vision.global.block_count", v["num_global_layers"])
    w.add_array("mllama.vision.intermediate_layers_indices", v["intermediate_layers_indices"])
    w.add_uint32("mllama.vision.embedding_length", v["hidden_size"])
    w.add_uint32("mllama.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("mllama.vision.attention.head_count", v["attention_heads"])
    w.add_float32("mllama.vision.attention.layer_norm_epsilon", v["norm_eps"])
    w.add_uint32("mllama.vision.image_size", v["image_size"])
    w.add_uint32("mllama.vision.patch_size", v["patch_size"])
    w.add_uint32("mllama.vision.max_num_tiles", v["max_num_tiles"])
    w.add_uint32("mllama.vision.num_channels", v["num_channels"])
    if projection:
        w.add_uint32("mllama.vision.projection_dim", cfg["text_config"]["hidden_size"])


def _ollama_type(name: str, w: np.ndarray, quant: str | None) -> dtypes.TypeInfo:
    """Ollama's rules: 1-D and the tile tables F32; v.* / mm.* F16 at most; text linears quantized."""
    if w.ndim <= 1 or "position_embd" in name:
        return dtypes.lookup("f32")
    if quant is None:
        return dtypes.lookup("f32")
    if name.startswith(("v.", "mm.")) or name.endswith("_norm.weight"):
        return dtypes.lookup("f16")
    ti = dtypes.lookup(quant)
    return ti if ti.fits(w.shape[-1]) else dtypes.lookup("q8_0") if dtypes.lookup("q8_0").fits(w.shape[-1]) else dtypes.lookup("f16")


def _write(path: Path, tensors: dict, key_writers, quant: str | None) -> Path:
    w = GGUFWriter(path, arch="mllama")
    w.add_uint32("general.file_type", 0 if quant is None else 7)
    for add in key_writers:
        add(w)
    for name, arr in tensors.items():
        ti = _ollama_type(name, arr, quant)
        rows = arr.reshape(-1, arr.shape[-1] if arr.ndim else 1)
        shape = arr.shape if arr.ndim else (1,)
        data = np.frombuffer(dtypes.encode(rows, ti), dtype=np.uint8).reshape(*shape[:-1], -1)  # bytes per row
        w.add_tensor(name, data, raw_dtype=Q(ti.id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenizer_fields(gguf_path: Path) -> dict:
    r = GGUFReader(gguf_path)
    return {"tokens": r.fields["tokenizer.ggml.tokens"].contents(), "types": r.fields["tokenizer.ggml.token_type"].contents(),
            "merges": r.fields["tokenizer.ggml.merges"].contents(), "template": r.fields["tokenizer.chat_template"].contents()}


def write_era_b(out: Path, hf: dict, cfg: dict, tok: dict | None, quant: str | None = None, permute_norms: bool = False) -> Path:
    text, vision = _tensors(hf, cfg, "B", permute_norms)
    return _write(out, {**text, **vision}, [lambda w: _text_keys(w, cfg, tok), lambda w: _vision_keys(w, cfg, False)], quant)


def write_era_a(out_dir: Path, hf: dict, cfg: dict, tok: dict) -> tuple[Path, Path]:
    text, vision = _tensors(hf, cfg, "A", False)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = _write(out_dir / "text.gguf", text, [lambda w: _text_keys(w, cfg, tok)], None)
    proj_path = _write(out_dir / "projector.gguf", vision, [lambda w: _vision_keys(w, cfg, True)], None)
    return text_path, proj_path
