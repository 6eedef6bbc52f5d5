"""Convert a Hugging Face `MllamaForConditionalGeneration` checkpoint to an mllama GGUF file.

    mllama.convert("Llama-3.2-11B-Vision-Instruct", "model.gguf", type="q4_k_m")

Text weights take the requested type (quantized by ggml itself; the mixes "q4_k_m" and "q5_k_m"
give the output matrix and the value/down projections of the layers that matter most Q6_K, as
llama.cpp's mixes of the same names do); the vision tower and projector are
never quantized (F16 at most; position/tile tables, gates and norms F32). Tensors are converted one
row chunk at a time, so memory stays far below the checkpoint size. The output is written to a
temporary file, checked by loading it, and renamed into place: an interrupted or failed conversion
never leaves a half-written model, and an existing file is only replaced with force=True.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .._native import dtypes as T
from .._native import names
from .._native.errors import ConversionError
from ..model import Model
from .hf_config import metadata, read_config
from .safetensors import SourceTensor, open_checkpoint
from .tensor_map import VISION_TABLES, Target, map_name
from .tokenizer import TokenizerData, read_tokenizer
from .writer import PlannedTensor, write_gguf

__all__ = ["convert", "ConversionError"]

CONVERTER_VERSION = "1"
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
              "q3_k": 11, "q4_k": 14, "q4_k_m": 15, "q5_k": 16, "q5_k_m": 17, "q6_k": 18, "bf16": 32}
MIXES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}  # mix name -> base type


def uses_more_bits(layer: int, n_layer: int) -> bool:
    """The layers whose value/down projections a _M mix keeps at Q6_K: the first and last eighth and
    every third layer between (the rule of llama.cpp's mixes)."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def mix_type(mix: str, target: Target, n_layer: int) -> str:
    """The type a tensor takes under a mix (or the mix name itself when not a mix)."""
    if mix not in MIXES:
        return mix
    if target.tensor_id == "OUTPUT":
        return "q6_k"
    if target.tensor_id in ("ATTN_V", "FFN_DOWN", "CROSS_V") and target.layer is not None and uses_more_bits(target.layer, n_layer):
        return "q6_k"
    return MIXES[mix]
VISION_TYPES = ("f32", "f16", "bf16")


def _text_type(src: SourceTensor, wanted: T.TypeInfo) -> T.TypeInfo:
    """The requested type, or the closest one whose block size divides the row length."""
    if wanted.fits(src.n_per_row):
        return wanted
    q8 = T.lookup("q8_0")
    return q8 if q8.fits(src.n_per_row) else T.lookup("f16")


def choose_type(target: Target, src: SourceTensor, text_type: T.TypeInfo, vision_type: T.TypeInfo) -> T.TypeInfo:
    f32 = T.lookup("f32")
    if len(src.shape) <= 1 or target.tensor_id in VISION_TABLES:
        return f32  # norms, biases, gates, CLS, position/tile tables
    if target.is_vision:
        return vision_type
    return _text_type(src, text_type)


def plan(sources: dict, text_type: str, vision_type: T.TypeInfo, n_layer: int) -> list[PlannedTensor]:
    """GGUF name and type of every checkpoint tensor, in file order (text first, then vision)."""
    planned = []
    for hf_name, src in sources.items():
        target = map_name(hf_name)
        name = names.tensor(target.tensor_id, target.layer)
        wanted = T.lookup(mix_type(text_type, target, n_layer))
        planned.append(PlannedTensor(name, src, choose_type(target, src, wanted, vision_type)))
    seen = set()
    for p in planned:
        if p.name in seen:
            raise ConversionError(f"two checkpoint tensors map to '{p.name}'")
        seen.add(p.name)
    return sorted(planned, key=lambda p: (p.name.startswith(("v.", "mm.")), _layer_key(p.name)))


def _layer_key(name: str) -> tuple:
    parts = name.split(".")
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in parts)


def file_metadata(name: str, text_type: str, meta: dict[str, Any], tok: TokenizerData) -> list[tuple[str, Any]]:
    """Every key of an mllama GGUF: general, the hparams in `meta` (names.key ids) and the tokenizer."""
    k = names.key
    out: list[tuple[str, Any]] = [
        (k("GENERAL_NAME"), name),
        (k("GENERAL_FILE_TYPE"), FILE_TYPES.get(text_type, 1)),
        (k("WEIGHTS_CONVENTION"), "hf"),
        (k("CONVERTER_VERSION"), CONVERTER_VERSION),
    ]
    out += [(k(key_id), value) for key_id, value in meta.items()]
    out += [
        (k("TOK_MODEL"), "gpt2"),
        (k("TOK_PRE"), "llama-bpe"),
        (k("TOK_TOKENS"), tok.tokens),
        (k("TOK_TOKEN_TYPE"), tok.token_types),
        (k("TOK_MERGES"), tok.merges),
        (k("TOK_ADD_BOS"), tok.add_bos),
    ]
    if tok.chat_template:
        out.append((k("TOK_CHAT_TEMPLATE"), tok.chat_template))
    return out


def _progress(total: int, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    if not enabled:
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting")
    return bar.update, bar.close


def _verify(path: Path) -> None:

    try:
        Model(path, device="cpu").close()
    except Exception as exc:  # the file was written but does not load: never hand it out
        raise ConversionError(f"the converted model does not load: {exc}") from None


def _is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (a conversion's earlier output, which force=True may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Whether path lies in folder, as named or with links followed (a hub cache's snapshot is links into its
    blobs: the file a link names is the checkpoint's as much as the link)."""
    return (Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder)) or
            path.resolve().is_relative_to(folder.resolve()))


def convert(hf_dir: str | os.PathLike, output: str | os.PathLike, type: str = "f16", *,
            vision_type: str | None = None, force: bool = False, progress: bool = False,
            verify: bool = True) -> Path:
    """Convert the checkpoint folder `hf_dir` to the GGUF file `output`; returns the output path."""
    folder, out = Path(hf_dir), Path(output)
    if not isinstance(type, str):
        raise TypeError(f"type must be a type name such as 'q4_k_m' or 'f16', not {type!r}")
    type = type.lower()
    text_type = T.lookup(MIXES.get(type, type))
    vtype_name = vision_type or ("f32" if text_type.name.lower() == "f32" else "bf16" if text_type.name.lower() == "bf16" else "f16")
    if vtype_name not in VISION_TYPES:
        raise ConversionError(f"vision weights are kept unquantized: vision_type must be one of {', '.join(VISION_TYPES)}")
    if out.is_dir():
        raise ConversionError(f"{out} is a folder: name the GGUF file to write")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    if out.exists() and _inside(out, folder) and not _is_gguf(out):
        raise ConversionError(f"{out} is a file of the checkpoint being converted: write the GGUF elsewhere")
    cfg = read_config(folder)
    tok = read_tokenizer(folder)
    meta = metadata(cfg, tok)
    tensors = plan(open_checkpoint(folder), type, T.lookup(vtype_name), int(meta["BLOCK_COUNT"]))
    _make_parent(out)
    tmp = out.with_name(f".{out.name[:40]}.{os.getpid()}.partial")  # (a name of up to 255 bytes stays one)
    update, close = _progress(sum(t.source.n_elements * 4 for t in tensors), progress)
    try:
        write_gguf(tmp, file_metadata(folder.resolve().name, type, meta, tok), tensors, update)
        close()
        if verify:
            _verify(tmp)
        os.replace(tmp, out)
    except BaseException as exc:
        close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename) in (tmp, out):
            raise ConversionError(f"cannot write {out}: {exc.strerror or exc}") from None  # (it named the temp file)
        raise
    return out


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # (a raw "[Errno 17] File exists: 'red.png'" for red.png/x.gguf)
        blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else exc.strerror or str(exc)
        raise ConversionError(f"cannot create the folder of {out}: {why}") from None
