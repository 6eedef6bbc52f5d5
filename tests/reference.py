"""The transformers reference, patched to Meta's semantics (llama_models 0.3.0
llama3/multimodal/model.py), plus a PyTorch hook dumper that writes the same node names as
mllama's tensor dumps.

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


def _meta_cross_layer_forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                              full_text_row_masked_out_mask, position_ids=None, past_key_values=None, use_cache=False,
                              position_embeddings=None, **kwargs):
    # Meta's CrossAttentionTransformerBlock: rows with no image get neither the attention nor the MLP output.
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.cross_attn(hidden_states=hidden_states, attention_mask=cross_attention_mask,
                                       cross_attention_states=cross_attention_states, past_key_values=past_key_values, **kwargs)
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states
    residual = hidden_states
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


def patch_meta_text(model) -> None:
    text = model.model.language_model
    for i in text.config.cross_attention_layers:
        layer = text.layers[i]
        layer.forward = types.MethodType(_meta_cross_layer_forward, layer)


def patch_meta(model):
    """Both departures from Meta's code: the model then follows Meta's reference."""
    patch_meta_vision(model)
    patch_meta_text(model)
    return model


def hf_inputs(tokens: list[int], images: list, image_token: int = 128256) -> dict:
    """Model inputs for one sequence: images are mllama.preprocess results, in prompt order."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    inputs = {"input_ids": torch.tensor([tokens])}
    if images:
        n = len(images)
        inputs["pixel_values"] = torch.from_numpy(np.stack([im.pixel_values for im in images])[None])
        inputs["aspect_ratio_ids"] = torch.tensor([[im.aspect_ratio_id for im in images]])
        mask = np.zeros((1, n, images[0].pixel_values.shape[0]), dtype=np.int64)
        for m, im in enumerate(images):
            mask[0, m, :im.n_tiles] = 1
        inputs["aspect_ratio_mask"] = torch.from_numpy(mask)
        sparse = get_cross_attention_token_mask(tokens, image_token)
        dense = convert_sparse_cross_attention_mask_to_dense([sparse], [[im.n_tiles for im in images]],
                                                             max_num_tiles=images[0].pixel_values.shape[0], length=len(tokens))
        inputs["cross_attention_mask"] = torch.from_numpy(dense)
    return inputs


def hf_logits(model, tokens: list[int], images: list) -> np.ndarray:
    with torch.no_grad():
        return model(**hf_inputs(tokens, images)).logits[0].float().numpy()


def hf_greedy(model, tokens: list[int], images: list, n: int, eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(**hf_inputs(tokens, images), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=128004)
    return out[0, len(tokens):].tolist()
