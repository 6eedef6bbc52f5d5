"""The transformers reference, patched to Meta's semantics (spec "Ground truth"), plus a PyTorch
hook dumper that writes the same node names as mllama's tensor dumps.

Patch 1 (vision): intermediate features are the INPUT of the listed local layers (Meta's
ImageTransformer appends x before running layer idx), not transformers 5.23's output-of-layer.
Patch 2 (text, cross-attention rows before the first image) lives with the decoder tests.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput


def _meta_encoder_forward(self, hidden_states, attention_mask=None):
    encoder_states = ()
    for layer in self.layers:
        encoder_states = encoder_states + (hidden_states,)  # the input of each layer (Meta)
        hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=encoder_states)


def patch_meta_vision(model) -> None:
    encoder = model.model.vision_model.transformer
    encoder.forward = types.MethodType(_meta_encoder_forward, encoder)


def vision_reference(model, pixel_values: np.ndarray, aspect_ratio_id: int, n_tiles: int) -> np.ndarray:
    """Vision output (max_tiles, n_positions, output_dim) for one image."""
    nt = pixel_values.shape[0]
    mask = np.zeros((1, 1, nt), dtype=np.int64)
    mask[0, 0, :n_tiles] = 1
    with torch.no_grad():
        out = model.model.vision_model(
            pixel_values=torch.from_numpy(pixel_values[None, None]),
            aspect_ratio_ids=torch.tensor([[aspect_ratio_id]]),
            aspect_ratio_mask=torch.from_numpy(mask),
        ).last_hidden_state
    return out[0, 0].numpy()


def cross_kv_reference(model, vision_out: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(K after k_norm, V) per cross-attention layer, each (n_vis, n_head_kv, head_dim)."""
    text = model.model.language_model
    cfg = text.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        xs = model.model.multi_modal_projector(torch.from_numpy(vision_out)).reshape(-1, cfg.hidden_size)
        out = []
        for i in cfg.cross_attention_layers:
            attn = text.layers[i].cross_attn
            k = attn.k_norm(attn.k_proj(xs).view(-1, cfg.num_key_value_heads, head_dim))
            v = attn.v_proj(xs).view(-1, cfg.num_key_value_heads, head_dim)
            out.append((k.numpy(), v.numpy()))
    return out


class HookDumper:
    """Writes transformers' intermediate tensors under mllama's node names (<name>.npy)."""

    def __init__(self, model, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.handles = []
        vision = model.model.vision_model
        self._hook(vision.layernorm_pre, "v.pre_ln")
        for prefix, layers in (("v.blk", vision.transformer.layers), ("v.global.blk", vision.global_transformer.layers)):
            for i, layer in enumerate(layers):
                self._hook(layer.self_attn, f"{prefix}.{i}.attn_out")
                self._hook(layer.mlp, f"{prefix}.{i}.ffn_out")
                self._hook(layer, f"{prefix}.{i}.out")
        self._hook(vision.layernorm_post, "v.post_ln")
        self._hook(vision, "v.output")
        self._hook(model.model.multi_modal_projector, "mm.out")

    def _hook(self, module, name: str) -> None:
        def save(_module, _inputs, output):
            if isinstance(output, tuple):
                output = output[0]
            if hasattr(output, "last_hidden_state"):
                output = output.last_hidden_state
            np.save(self.folder / f"{name}.npy", output.detach().float().numpy())

        self.handles.append(module.register_forward_hook(save))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
