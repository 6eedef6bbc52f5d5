"""Read a Hugging Face Llama 3.2 Vision folder's JSON files into GGUF metadata (key ID -> value)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._native.errors import ConversionError
from .._native.system import default_aspect_ratios, image_defaults
from .tokenizer import TokenizerData



@dataclass
class HFConfig:
    config: dict
    text: dict
    vision: dict
    preprocessor: dict
    generation: dict


def _load_json(path: Path, required: bool) -> dict:
    if not path.exists():
        if required:
            raise ConversionError(f"{path.parent} is not a Hugging Face checkpoint: {path.name} is missing")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return value


def read_config(folder: Path) -> HFConfig:
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder")
    config = _load_json(folder / "config.json", required=True)
    if config.get("model_type") != "mllama":
        raise ConversionError(f"{folder}/config.json has model_type {config.get('model_type')!r}, expected 'mllama'")
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConversionError(f"{folder}/config.json lacks text_config or vision_config")
    return HFConfig(config, text, vision,
                    _load_json(folder / "preprocessor_config.json", required=False),
                    _load_json(folder / "generation_config.json", required=False))


def _need(section: dict, key: str, where: str) -> Any:
    if key not in section:
        raise ConversionError(f"config.json {where} has no '{key}'")
    return section[key]


def _rope(text: dict) -> dict[str, Any]:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 500000.0))
    out: dict[str, Any] = {"ROPE_FREQ_BASE": float(theta)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "llama3":
        out.update({
            "ROPE_SCALING_TYPE": "llama3",
            "ROPE_SCALING_FACTOR": float(params["factor"]),
            "ROPE_SCALING_LOW_FREQ_FACTOR": float(params["low_freq_factor"]),
            "ROPE_SCALING_HIGH_FREQ_FACTOR": float(params["high_freq_factor"]),
            "ROPE_SCALING_ORIG_CTX": int(params["original_max_position_embeddings"]),
        })
    elif rope_type not in ("default", None):
        raise ConversionError(f"rope type '{rope_type}' is not supported")
    else:
        out["ROPE_SCALING_TYPE"] = "none"
    return out


def _vision_keys(cfg: HFConfig) -> dict[str, Any]:
    v, pre = cfg.vision, cfg.preprocessor
    image_size = int(_need(v, "image_size", "vision_config"))
    size = pre.get("size", {"height": image_size, "width": image_size})
    if size.get("height") != image_size or size.get("width") != image_size:
        raise ConversionError(f"preprocessor size {size} does not match the vision image_size {image_size}")
    max_tiles = int(v.get("max_num_tiles", 4))
    if pre and int(pre.get("max_image_tiles", max_tiles)) != max_tiles:
        raise ConversionError("preprocessor max_image_tiles differs from vision max_num_tiles")
    ratios = v.get("supported_aspect_ratios") or [list(r) for r in default_aspect_ratios(max_tiles)]
    mean, std = image_defaults()
    return {
        "V_BLOCK_COUNT": int(_need(v, "num_hidden_layers", "vision_config")),
        "V_GLOBAL_BLOCK_COUNT": int(_need(v, "num_global_layers", "vision_config")),
        "V_INTERMEDIATE_LAYERS": [int(i) for i in _need(v, "intermediate_layers_indices", "vision_config")],
        "V_EMBEDDING_LENGTH": int(_need(v, "hidden_size", "vision_config")),
        "V_FEED_FORWARD_LENGTH": int(_need(v, "intermediate_size", "vision_config")),
        "V_HEAD_COUNT": int(v.get("attention_heads", v.get("num_attention_heads", 16))),
        "V_NORM_EPS": float(v.get("norm_eps", 1e-5)),
        "V_IMAGE_SIZE": image_size,
        "V_PATCH_SIZE": int(_need(v, "patch_size", "vision_config")),
        "V_NUM_CHANNELS": int(v.get("num_channels", 3)),
        "V_MAX_NUM_TILES": max_tiles,
        "V_ASPECT_RATIOS": [int(x) for pair in ratios for x in pair],
        "V_IMAGE_MEAN": [float(x) for x in pre.get("image_mean", mean)],
        "V_IMAGE_STD": [float(x) for x in pre.get("image_std", std)],
        "V_PROJECTION_DIM": int(_need(cfg.text, "hidden_size", "text_config")),
    }


def _text_keys(text: dict) -> dict[str, Any]:
    n_embd = int(_need(text, "hidden_size", "text_config"))
    n_head = int(_need(text, "num_attention_heads", "text_config"))
    if n_head < 1 or n_embd % n_head:
        raise ConversionError(f"config.json text_config: num_attention_heads {n_head} does not divide "
                              f"hidden_size {n_embd}")
    return {
        "VOCAB_SIZE": int(_need(text, "vocab_size", "text_config")),
        "CONTEXT_LENGTH": int(text.get("max_position_embeddings", 131072)),
        "EMBEDDING_LENGTH": n_embd,
        "FEED_FORWARD_LENGTH": int(_need(text, "intermediate_size", "text_config")),
        "BLOCK_COUNT": int(_need(text, "num_hidden_layers", "text_config")),
        "HEAD_COUNT": n_head,
        "HEAD_COUNT_KV": int(text.get("num_key_value_heads", n_head)),
        "RMS_EPS": float(text.get("rms_norm_eps", 1e-5)),
        "CROSS_ATTENTION_LAYERS": [int(i) for i in _need(text, "cross_attention_layers", "text_config")],
        "ROPE_DIMENSION_COUNT": n_embd // n_head,
        **_rope(text),
    }


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _token_keys(cfg: HFConfig, tok: TokenizerData) -> dict[str, Any]:
    gen, text = cfg.generation, cfg.text
    eos_ids = gen.get("eos_token_id", text.get("eos_token_id"))
    eos_list = [int(i) for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]) if i is not None]
    eot = tok.id_of("<|eot_id|>")
    out: dict[str, Any] = {
        "IMAGE_TOKEN_ID": int(cfg.config.get("image_token_index", cfg.config.get("image_token_id", 128256))),
        "TOK_BOS_ID": int(_first(gen.get("bos_token_id", text.get("bos_token_id", 128000)))),
        "TOK_EOS_ID": eot if eot is not None else eos_list[0],
        "TOK_EOS_IDS": eos_list,
        "TOK_PAD_ID": int(_first(gen.get("pad_token_id", text.get("pad_token_id", 0)))),
    }
    if eot is not None:
        out["TOK_EOT_ID"] = eot
    if tok.id_of("<|eom_id|>") is not None:
        out["TOK_EOM_ID"] = tok.id_of("<|eom_id|>")
    return out


def _generation_keys(gen: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "temperature" in gen:
        out["GEN_TEMPERATURE"] = float(gen["temperature"])
    if "top_p" in gen:
        out["GEN_TOP_P"] = float(gen["top_p"])
    if "top_k" in gen:
        out["GEN_TOP_K"] = int(gen["top_k"])
    if "do_sample" in gen:
        out["GEN_DO_SAMPLE"] = bool(gen["do_sample"])
    return out


def metadata(cfg: HFConfig, tok: TokenizerData) -> dict[str, Any]:
    """Key ID -> value for everything but the architecture, names and tokenizer arrays."""
    try:
        out = {**_text_keys(cfg.text), **_vision_keys(cfg), **_token_keys(cfg, tok), **_generation_keys(cfg.generation)}
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # (ConversionError: as it is)
        if isinstance(exc, ConversionError):
            raise
        detail = f"no {exc}" if isinstance(exc, KeyError) else f"{exc!s:.200}"
        raise ConversionError(f"config.json has a missing or malformed field ({detail})") from None
    v = cfg.vision
    expected_out = out["V_EMBEDDING_LENGTH"] * (len(out["V_INTERMEDIATE_LAYERS"]) + 1)
    if int(v.get("vision_output_dim", expected_out)) != expected_out:
        raise ConversionError(f"vision_output_dim {v.get('vision_output_dim')} != hidden_size * (intermediate layers + 1) = {expected_out}")
    return out
