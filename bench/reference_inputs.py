"""Bench helper: transformers inputs for one prompt with one preprocessed image."""

from __future__ import annotations

import numpy as np


def hf_inputs_for(tokens: list[int], pre, dtype, device="cpu"):
    import torch
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    mask = np.zeros((1, 1, pre.pixel_values.shape[0]), dtype=np.int64)
    mask[0, 0, :pre.n_tiles] = 1
    sparse = get_cross_attention_token_mask(tokens, 128256)
    dense = convert_sparse_cross_attention_mask_to_dense([sparse], [[pre.n_tiles]], max_num_tiles=pre.pixel_values.shape[0],
                                                         length=len(tokens))
    inputs = {"input_ids": torch.tensor([tokens]), "pixel_values": torch.from_numpy(pre.pixel_values[None, None]).to(dtype),
            "aspect_ratio_ids": torch.tensor([[pre.aspect_ratio_id]]), "aspect_ratio_mask": torch.from_numpy(mask),
            "cross_attention_mask": torch.from_numpy(dense)}
    return {name: value.to(device) for name, value in inputs.items()}
