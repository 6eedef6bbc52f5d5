"""Hugging Face parameter names -> GGUF tensor IDs (see mllama.names), for both the hub's on-disk
names (`language_model.model.*`, `vision_model.*`, `multi_modal_projector.*`) and transformers 5's
in-memory names (`model.language_model.*`, `model.vision_model.*`, `lm_head.weight`, ...).

Weights are stored RAW: no permutes, gates as trained (tanh is applied by the runtime)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._native.errors import ConversionError

# Component prefixes (hub names first, then transformers-5 in-memory names).
_PREFIXES = [
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("vision_model.", "vision."),
    ("model.vision_model.", "vision."),
    ("multi_modal_projector.", "mm."),
    ("model.multi_modal_projector.", "mm."),
]

_TEXT_GLOBAL = {
    "lm_head.weight": "OUTPUT",
    "text.embed_tokens.weight": "TOKEN_EMBD",
    "text.norm.weight": "OUTPUT_NORM",
    "mm.weight": "MM_W",
    "mm.bias": "MM_B",
}

_TEXT_LAYER = {
    "input_layernorm.weight": "ATTN_NORM",
    "post_attention_layernorm.weight": "FFN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
    "cross_attn.q_proj.weight": "CROSS_Q",
    "cross_attn.k_proj.weight": "CROSS_K",
    "cross_attn.v_proj.weight": "CROSS_V",
    "cross_attn.o_proj.weight": "CROSS_O",
    "cross_attn.q_norm.weight": "CROSS_Q_NORM",
    "cross_attn.k_norm.weight": "CROSS_K_NORM",
    "cross_attn_attn_gate": "CROSS_ATTN_GATE",
    "cross_attn_mlp_gate": "CROSS_MLP_GATE",
}

_VISION_GLOBAL = {
    "patch_embedding.weight": "V_PATCH_EMBD",
    "class_embedding": "V_CLASS_EMBD",
    "gated_positional_embedding.embedding": "V_POS_EMBD",
    "gated_positional_embedding.gate": "V_POS_GATE",
    "gated_positional_embedding.tile_embedding.weight": "V_TILE_POS_EMBD",
    "pre_tile_positional_embedding.embedding.weight": "V_PRE_TILE_EMBD",
    "pre_tile_positional_embedding.gate": "V_PRE_TILE_GATE",
    "post_tile_positional_embedding.embedding.weight": "V_POST_TILE_EMBD",
    "post_tile_positional_embedding.gate": "V_POST_TILE_GATE",
    "layernorm_pre.weight": "V_PRE_LN_W",
    "layernorm_pre.bias": "V_PRE_LN_B",
    "layernorm_post.weight": "V_POST_LN_W",
    "layernorm_post.bias": "V_POST_LN_B",
}

_VISION_LAYER = {
    "input_layernorm.weight": "ATTN_NORM_W",
    "input_layernorm.bias": "ATTN_NORM_B",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "post_attention_layernorm.weight": "FFN_NORM_W",
    "post_attention_layernorm.bias": "FFN_NORM_B",
    "mlp.fc1.weight": "FFN_UP_W",
    "mlp.fc1.bias": "FFN_UP_B",
    "mlp.fc2.weight": "FFN_DOWN_W",
    "mlp.fc2.bias": "FFN_DOWN_B",
    "gate_attn": "ATTN_GATE",
    "gate_ffn": "FFN_GATE",
}

_LAYER_RE = re.compile(r"^(text\.layers|vision\.transformer\.layers|vision\.global_transformer\.layers)\.(\d+)\.(.+)$")

# Tensors that hold embedding tables of the vision tower: kept F32 whatever the target type.
VISION_TABLES = {"V_POS_EMBD", "V_TILE_POS_EMBD", "V_PRE_TILE_EMBD", "V_POST_TILE_EMBD"}


@dataclass(frozen=True)
class Target:
    tensor_id: str
    layer: int | None

    @property
    def is_vision(self) -> bool:
        return self.tensor_id.startswith(("V_", "VG_", "MM_"))


def _normalize(hf_name: str) -> str | None:
    for prefix, replacement in _PREFIXES:
        if hf_name.startswith(prefix):
            return replacement + hf_name[len(prefix):]
    return None


def map_name(hf_name: str) -> Target:
    """The GGUF target of one HF parameter; ConversionError for a name this model does not have."""
    name = _normalize(hf_name)
    if name is not None and name in _TEXT_GLOBAL:
        return Target(_TEXT_GLOBAL[name], None)
    if name is not None and name.startswith("vision.") and name[7:] in _VISION_GLOBAL:
        return Target(_VISION_GLOBAL[name[7:]], None)
    match = _LAYER_RE.match(name or "")
    if match:
        block, layer, rest = match.group(1), int(match.group(2)), match.group(3)
        if block == "text.layers" and rest in _TEXT_LAYER:
            return Target(_TEXT_LAYER[rest], layer)
        if block.startswith("vision") and rest in _VISION_LAYER:
            is_global = block == "vision.global_transformer.layers"
            suffix = _VISION_LAYER[rest]
            if suffix in ("ATTN_GATE", "FFN_GATE") and not is_global:
                raise ConversionError(f"unexpected gate '{hf_name}' in a local vision layer")
            return Target(("VG_" if is_global else "V_") + suffix, layer)
    raise ConversionError(f"unknown parameter '{hf_name}': not part of a Llama 3.2 Vision checkpoint")
