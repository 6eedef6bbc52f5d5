"""Preprocessing is bit-identical to transformers' MllamaImageProcessorPil (transformers 5.23.0)."""

from __future__ import annotations

import base64
import io
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama.image.preprocess import ImageConfig, ImageError, preprocess


def reference(image: Image.Image, pre_cfg: dict):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    cfg = {k: v for k, v in pre_cfg.items() if k != "image_processor_type"}
    out = MllamaImageProcessorPil(**cfg)(images=[[image]], return_tensors="np")
    return out["pixel_values"][0, 0], int(out["aspect_ratio_ids"][0, 0]), int(out["num_tiles"][0][0])


def pre_config(tile: int) -> dict:
    return {"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "max_image_tiles": 4, "resample": 2, "rescale_factor": 0.00392156862745098,
            "size": {"height": tile, "width": tile}}


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + w * 7919 + h)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "CMYK": 4}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    data = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if mode == "RGBA":
        data[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, data[..., 3])  # fully transparent pixels
    return Image.fromarray(data, mode)


T = 56
SIZES = [  # (width, height): every aspect id, upscale, downscale, no resize, exact tile multiples, extremes
    (1, 1), (1, 40), (40, 1), (1, 300), (300, 1), (20, 20), (56, 56), (112, 56), (56, 112), (168, 56), (56, 168),
    (224, 56), (56, 224), (112, 112), (100, 40), (40, 100), (30, 90), (90, 30), (200, 200), (300, 100),
    (100, 300), (500, 60), (60, 500), (57, 57), (55, 111), (113, 57), (111, 167), (1000, 10), (10, 1000),
    (640, 480), (480, 640), (97, 53), (53, 97), (150, 149), (223, 55), (224, 224), (17, 61), (61, 17),
]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_reference_rgb(size):
    image = noise(*size)
    ours = preprocess(image, ImageConfig.from_preprocessor_config(pre_config(T)))
    ref_pixels, ref_id, ref_tiles = reference(image, pre_config(T))
    assert (ours.aspect_ratio_id, ours.n_tiles) == (ref_id, ref_tiles)
    assert ours.pixel_values.dtype == np.float32
    assert np.array_equal(ours.pixel_values, ref_pixels)
    assert np.all(ours.pixel_values[ours.n_tiles:] == 0.0)


def test_grid_covers_every_aspect_ratio_id():
    cfg = ImageConfig.from_preprocessor_config(pre_config(T))
    ids = {preprocess(noise(*s), cfg).aspect_ratio_id for s in SIZES}
    assert ids == set(range(1, 9))


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "PA", "LA", "I;16", "1"])
def test_modes_match_reference(mode):
    base = noise(90, 45, "RGBA", seed=3)
    if mode == "P":
        image = base.convert("RGB").convert("P", palette=Image.ADAPTIVE)
        image.info["transparency"] = 5
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(base)[..., 0].astype(np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "CMYK":
        image = noise(90, 45, "CMYK", seed=3)
    else:
        image = base.convert(mode)
    ours = preprocess(image, ImageConfig.from_preprocessor_config(pre_config(T)))
    # 16-bit grayscale is scaled to 8 bits, where transformers' conversion clips it to white (README, "Faithful
    # to the trained model"): the reference of its 8-bit version
    ref_pixels, ref_id, _ = reference(base.getchannel("R") if mode == "I;16" else image, pre_config(T))
    assert ours.aspect_ratio_id == ref_id
    assert np.array_equal(ours.pixel_values, ref_pixels)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (56, 56), (10, 20, 30, 0))
    pixels = preprocess(image, ImageConfig.from_preprocessor_config(pre_config(T))).pixel_values
    white = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073], np.float32)) / np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    assert np.allclose(pixels[0, :, 10, 10], white)


def test_exif_rotated_jpeg_file(tmp_path):
    from PIL import ImageOps

    image = noise(120, 40, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=95)
    ours = preprocess(path, ImageConfig.from_preprocessor_config(pre_config(T)))
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert upright.size == (40, 120)
    ref_pixels, ref_id, _ = reference(upright, pre_config(T))
    assert ours.aspect_ratio_id == ref_id == 7  # 3 rows x 1 column: a tall image after rotation
    assert np.array_equal(ours.pixel_values, ref_pixels)


@pytest.mark.parametrize("size", [(1280, 853), (669, 446), (560, 560), (300, 2000)])
def test_real_tile_size_worked_examples(size):
    image = noise(*size, seed=9)
    ours = preprocess(image, ImageConfig.from_preprocessor_config(pre_config(560)))
    ref_pixels, ref_id, ref_tiles = reference(image, pre_config(560))
    assert (ours.aspect_ratio_id, ours.n_tiles) == (ref_id, ref_tiles)
    assert np.array_equal(ours.pixel_values, ref_pixels)
    expected = {(1280, 853): (6, 4), (669, 446): (2, 2), (560, 560): (1, 1), (300, 2000): (8, 4)}[size]
    assert (ours.aspect_ratio_id, ours.n_tiles) == expected


def test_every_input_kind_gives_the_same_pixels(tmp_path):
    image = noise(70, 30, seed=11)
    path = tmp_path / "x.png"
    image.save(path)
    cfg = ImageConfig.from_preprocessor_config(pre_config(T))
    expected = preprocess(image, cfg).pixel_values
    data = path.read_bytes()
    encoded = base64.b64encode(data).decode()  # a string of base64, as Ollama's clients pass images
    for source in (str(path), path, data, io.BytesIO(data), np.asarray(image), encoded, "data:image/png;base64,"
                   + encoded, "file://" + str(path)):
        assert np.array_equal(preprocess(source, cfg).pixel_values, expected)


def test_image_names_that_are_not_files_say_what_they_are(tmp_path):
    cfg = ImageConfig.from_preprocessor_config(pre_config(T))
    for name, fragment in (("http://host/x.png", "'http://host/x.png': remote URLs are not fetched"),
                           (str(tmp_path), "is a directory"), ("Q" * 5000, "base64 data (5000 characters)"),
                           (str(tmp_path / "no.png"), "no such file"), ("no-such_file." * 400, "no such file")):
        with pytest.raises(ImageError, match=re.escape(fragment)):
            preprocess(name, cfg)


def test_config_from_the_model(gguf_f32, hf_dir):
    with mllama.Model(gguf_f32) as model:
        ours = mllama.preprocess(noise(100, 40), model)
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    ref_pixels, ref_id, ref_tiles = reference(noise(100, 40), pre)
    assert (ours.aspect_ratio_id, ours.n_tiles) == (ref_id, ref_tiles) == (2, 2)
    assert np.array_equal(ours.pixel_values, ref_pixels)


@pytest.mark.parametrize("source,fragment", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot read image"),
    (b"this is not an image at all", "cannot read image"),
    (np.zeros((4, 4), np.float32), "uint8"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (12345, "unsupported image input"),
])
def test_bad_images_raise_image_error(source, fragment):
    with pytest.raises(ImageError, match=fragment):
        preprocess(source, ImageConfig.from_preprocessor_config(pre_config(T)))


def test_truncated_and_missing_files(tmp_path):
    buf = io.BytesIO()
    noise(200, 200, seed=1).save(buf, format="PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cfg = ImageConfig.from_preprocessor_config(pre_config(T))
    with pytest.raises(ImageError, match="cannot read image"):
        preprocess(tmp_path / "t.png", cfg)
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "missing.png", cfg)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="notes.txt'"):  # the error names the file
        preprocess(tmp_path / "notes.txt", cfg)


def test_wide_grayscale_is_scaled_not_clipped(tmp_path):
    """16-bit grayscale (PNG) is scaled from 0..65535 and float (TIFF) from 0..1, not clipped to white or black as
    Pillow's conversion (and transformers') does: the same picture as its 8-bit version, within one level."""
    from mllama.image.preprocess import load_image, to_rgb

    levels = np.tile(np.arange(0, 256, dtype=np.uint8), (8, 1))  # 8 x 256: every 8-bit level
    wide = {"I;16": (levels.astype(np.uint16) * 257, "PNG"), "F": (levels.astype(np.float32) / 255, "TIFF")}
    for mode, (values, fmt) in wide.items():
        path = tmp_path / f"wide.{fmt.lower()}"
        Image.fromarray(values).save(path, format=fmt)
        image = load_image(path)
        assert image.mode.startswith(mode[0])
        rgb = to_rgb(image).astype(int)
        assert rgb.shape == (8, 256, 3) and np.abs(rgb - levels[..., None]).max() <= 1, mode
    wide_32 = Image.fromarray(levels.astype(np.int32) * 257)  # 32-bit "I" with 16-bit data: scaled too
    assert wide_32.mode == "I" and np.abs(to_rgb(wide_32).astype(int) - levels[..., None]).max() <= 1


def test_16bit_grayscale_keeps_its_transparent_value(tmp_path):
    """A 16-bit PNG's tRNS gray value is transparent, composited onto white as an 8-bit one's is (it had been
    dropped with the conversion to 8 bits: the pixels stayed dark)."""
    from mllama.image.preprocess import load_image, to_rgb

    values = np.full((4, 6), 1028, np.uint16)
    values[:, :3] = 40000
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path, transparency=1028)
    image = load_image(path)
    assert image.mode.startswith("I") and image.info["transparency"] == 1028
    rgb = to_rgb(image)
    assert (rgb[:, 3:] == 255).all() and (rgb[:, :3] == round(40000 / 257)).all()


def test_an_image_part_without_its_image():
    with pytest.raises(ImageError, match="no image given"):  # (had been "unsupported image input of type NoneType")
        preprocess(None, ImageConfig.from_preprocessor_config(pre_config(T)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/mem, and ru_maxrss in KiB: Linux's")
def test_unreadable_and_large_non_image_files(tmp_path):
    """A file it may not read is an ImageError (a raw OSError had ended `mllama chat` and been a server's 500);
    a large file that is no image is refused from its first bytes, not read whole into memory first."""
    import resource

    from mllama.image.preprocess import load_image

    with pytest.raises(ImageError, match="cannot read image '/proc/self/mem'"):  # (EIO, even as root)
        load_image("/proc/self/mem")
    big = tmp_path / "model.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF" + b"\0" * 1024)
        f.truncate(1 << 30)  # 1 GiB, sparse
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="not an image"):
        load_image(big)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: far below the file's


def test_32bit_grayscale_holding_8bit_data_reads_as_pillow_reads_it():
    """An "L" image converted to "I" (values 0..255) is not darkened 257-fold: Pillow's (transformers') pixels."""
    from mllama.image.preprocess import to_rgb

    levels = np.tile(np.arange(0, 256, dtype=np.uint8), (8, 1))
    image = Image.fromarray(levels).convert("I")
    assert image.mode == "I"
    assert np.array_equal(to_rgb(image), np.asarray(image.convert("RGB")))
    assert np.array_equal(to_rgb(image), np.repeat(levels[..., None], 3, axis=2))


def test_decompression_bomb(monkeypatch):
    """Past twice Pillow's limit: refused, as Pillow refuses it; past it once (Pillow warns): read, as transformers
    reads it (a 102-megapixel photo, past the ~89 MP warning, had been refused)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    config = ImageConfig.from_preprocessor_config(pre_config(T))
    big, warned = io.BytesIO(), io.BytesIO()
    noise(50, 50).save(big, format="PNG")
    noise(40, 40).save(warned, format="PNG")
    with pytest.raises(ImageError, match="too large"):
        preprocess(big.getvalue(), config)
    with pytest.warns(Image.DecompressionBombWarning):
        assert preprocess(warned.getvalue(), config).n_tiles >= 1
