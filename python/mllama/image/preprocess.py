"""Image preprocessing for Llama 3.2 Vision, bit-exact with transformers 5.23.0's MllamaImageProcessorPil
(models/mllama/image_processing_pil_mllama.py): canvas choice, resize without distortion (Pillow
BILINEAR), zero padding bottom/right, rescale + CLIP normalization, row-major tiles, unused tiles
exactly 0.0. Pure Pillow + numpy; every constant comes from the model file.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._native.errors import ImageError
from .._native.system import default_aspect_ratios, image_defaults
from ..hparams import HParams


@dataclass(frozen=True)
class ImageConfig:
    tile_size: int
    max_tiles: int
    aspect_ratios: tuple[tuple[int, int], ...]  # (tiles_h, tiles_w); aspect_ratio_id = index + 1
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    @classmethod
    def from_hparams(cls, hp) -> "ImageConfig":
        """From a model's HParams."""
        return cls(hp.v_image_size, hp.v_max_tiles, tuple(tuple(r) for r in hp.aspect_ratios),
                   tuple(hp.image_mean), tuple(hp.image_std))

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "ImageConfig":
        """From a Hugging Face preprocessor_config.json dict."""
        n = int(cfg.get("max_image_tiles", 4))
        mean, std = image_defaults()
        return cls(int(cfg["size"]["height"]), n, default_aspect_ratios(n), tuple(cfg.get("image_mean", mean)),
                   tuple(cfg.get("image_std", std)),
                   float(cfg.get("rescale_factor", 1 / 255)))


@dataclass(frozen=True)
class Preprocessed:
    pixel_values: np.ndarray  # float32 (max_tiles, 3, tile, tile); unused tiles are 0.0
    aspect_ratio_id: int      # 1-based index into the aspect ratio list
    n_tiles: int
    tiles: tuple[int, int]    # (tiles_h, tiles_w)


# --- loading ----------------------------------------------------------------------------------
def _open(data: Any, source: str):
    """The decoded image in `data` (a binary file object); `source` names it in errors ("'photo.jpg'", "data")."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:  # (past Pillow's warning size, ~89 megapixels, read as transformers reads it: a 102 MP photo had been
        image = Image.open(data)  # refused; past twice that, refused as Pillow refuses it)
        image.load()  # decode now: truncated or corrupt data fails here, not later
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {source} too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {source}: not an image, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {source}: {exc}") from None


def load_image(image: Any):
    """A PIL image from a path, pathlib.Path, bytes, binary file object, PIL image, uint8 array, data: URL or
    base64 string (as Ollama's clients pass images).

    Files and bytes get their EXIF orientation applied (as transformers' load_image does)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageError("cannot read image: empty data")
        return _open(io.BytesIO(bytes(image)), f"data ({len(image)} bytes)")
    if isinstance(image, (str, os.PathLike)):
        return _from_name(os.fspath(image))
    if hasattr(image, "read"):
        name = f"'{getattr(image, 'name', 'file object')}'"
        try:
            data = image.read()
        except (OSError, ValueError) as exc:  # a text-mode file (UnicodeDecodeError), a closed one
            raise ImageError(f"cannot read image {name}: {exc} (open image files in binary mode: 'rb')") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(f"cannot read image {name}: its read() gave {type(data).__name__}, not bytes "
                             "(open image files in binary mode: 'rb')")
        return _open(io.BytesIO(bytes(data)), name)
    if image is None:  # (had been "unsupported image input of type NoneType")
        raise ImageError("no image given (an image part without its \"image\"?)")
    raise ImageError(f"unsupported image input of type {type(image).__name__}")


_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]{64,}={0,2}")


def _from_name(name: str | bytes):
    """An image named by a string: a file, a data: URL, or base64 data (as Ollama's clients pass images)."""
    text = os.fsdecode(name)
    if not text:  # (Path("") is "."; it had been "'.' is a directory")
        raise ImageError("cannot read image: empty name")
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header:
            raise ImageError("cannot read image: only base64 data: URLs are supported")
        return _from_base64(payload, "data: URL")
    if "://" in text and not text.startswith("file://"):
        raise ImageError(f"cannot read image '{text:.80}': remote URLs are not fetched (pass a local path, bytes or "
                         "a data: URL)")
    path = Path(text.removeprefix("file://"))
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError):  # a name too long to be a file's
        is_file = is_dir = False
    if is_file:
        try:  # (read as Pillow needs it: a large file that is no image is refused from its first bytes)
            with open(path, "rb") as f:
                return _open(f, f"'{path}'")
        except OSError as exc:  # a file it may not read (it had been a raw PermissionError)
            raise ImageError(f"cannot read image '{path}': {exc.strerror or exc}") from None
    if is_dir:
        raise ImageError(f"cannot read image: '{path}' is a directory")
    if _BASE64.fullmatch(text):
        return _from_base64(text, f"base64 data ({len(text)} characters)")
    raise ImageError(f"cannot read image: no such file '{text:.200}'")


def _from_base64(payload: str, what: str):
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except ValueError as exc:
        raise ImageError(f"cannot read image: invalid base64 in the {what}: {exc}") from None
    if not data:
        raise ImageError(f"cannot read image: empty {what}")
    return _open(io.BytesIO(data), what)


def _from_array(array: np.ndarray):
    from PIL import Image

    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ImageError("image array is empty")
        return Image.fromarray(np.ascontiguousarray(array))
    raise ImageError(f"image arrays must be HxW, HxWx3 or HxWx4, got shape {array.shape}")


def to_rgb(image) -> np.ndarray:
    """uint8 HxWx3: transparency composited onto white, other modes converted by Pillow; 16-bit and 32-bit integer
    grayscale scaled from 0..65535 (32-bit within 0..255: kept) and float grayscale from 0..1 (or clipped to 0..255
    where it exceeds 1), where Pillow's conversion would clip them to white (as transformers' does)."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_gray_to_8bit(image)
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"unsupported image mode {image.mode}: {exc}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image has no pixels ({image.size[0]}x{image.size[1]})")
    return array


def _wide_gray_to_8bit(image):
    """An "I;16*", "I" or "F" image as an 8-bit "L" one (round half to even). A 32-bit "I" image whose values
    stay within 0..255 holds 8-bit data (an "L" image converted, say): kept as it is, as Pillow keeps it."""
    from PIL import Image

    raw = np.asarray(image)
    values = raw.astype(np.float64)
    if image.mode == "F":
        values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
    elif image.mode != "I" or np.max(values, initial=0.0) > 255.0:
        values = np.clip(values, 0, 65535) / 257.0
    gray = Image.fromarray(np.rint(np.nan_to_num(np.clip(values, 0, 255))).astype(np.uint8))
    transparent = image.info.get("transparency")  # a PNG's tRNS gray value (it had been dropped: not white)
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


# --- geometry (float64 arithmetic, as the reference) --------------------------------------------
def optimal_canvas(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """(canvas_h, canvas_w): smallest upscale >= 1, else the least downscale; ties -> smallest area."""
    sizes = [(a * cfg.tile_size, b * cfg.tile_size) for a, b in cfg.aspect_ratios]
    scales = []
    for ch, cw in sizes:
        sh, sw = ch / height, cw / width
        scales.append(sh if sw > sh else sw)
    ups = [s for s in scales if s >= 1]
    selected = min(ups) if ups else max(s for s in scales if s < 1)
    candidates = [sz for sz, s in zip(sizes, scales) if s == selected]
    return min(candidates, key=lambda hw: hw[0] * hw[1])  # first on ties, like np.argmin


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(new_h, new_w): the image resized into the canvas without distortion, never below a tile."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


# --- the pipeline -------------------------------------------------------------------------------
def preprocess_rgb(rgb: np.ndarray, cfg: ImageConfig) -> Preprocessed:
    from PIL import Image

    height, width = rgb.shape[:2]
    canvas_h, canvas_w = optimal_canvas(height, width, cfg)
    tiles_h, tiles_w = canvas_h // cfg.tile_size, canvas_w // cfg.tile_size
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, cfg.tile_size)
    if (new_h, new_w) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # padding is black before normalizing
    canvas[:new_h, :new_w] = rgb
    scaled = (canvas.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    normalized = (scaled - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    chw = normalized.transpose(2, 0, 1)  # [3, canvas_h, canvas_w]
    t = cfg.tile_size
    pixels = np.zeros((cfg.max_tiles, 3, t, t), dtype=np.float32)
    for r in range(tiles_h):
        for c in range(tiles_w):
            pixels[r * tiles_w + c] = chw[:, r * t:(r + 1) * t, c * t:(c + 1) * t]
    ratio_id = cfg.aspect_ratios.index((tiles_h, tiles_w)) + 1
    return Preprocessed(pixels, ratio_id, tiles_h * tiles_w, (tiles_h, tiles_w))


def image_config(model_or_config: Any) -> ImageConfig:
    if isinstance(model_or_config, ImageConfig):
        return model_or_config
    if isinstance(model_or_config, HParams):
        return ImageConfig.from_hparams(model_or_config)
    if isinstance(model_or_config, dict):
        return ImageConfig.from_preprocessor_config(model_or_config)
    if hasattr(model_or_config, "image_config"):
        return model_or_config.image_config
    raise TypeError("preprocess needs a Model, an ImageConfig, model hparams or a preprocessor_config dict")


def preprocess(image: Any, model_or_config: Any) -> Preprocessed:
    """Pixel tiles, aspect-ratio id and tile count for one image (see module docstring)."""
    return preprocess_rgb(to_rgb(load_image(image)), image_config(model_or_config))


__all__ = ["ImageConfig", "ImageError", "Preprocessed", "load_image", "optimal_canvas", "fit_to_canvas",
           "preprocess", "to_rgb"]
