"""Vision encoder and cross-attention K/V against the transformers reference patched to Meta's
semantics (tests/reference.py), on the tiny fixture: every tile count in both orientations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama.dev.compare_dumps import compare, first_divergence
from reference import HookDumper, cross_kv_reference, patch_meta_vision, vision_reference

# (width, height) -> tiles (h x w) at tile size 56: 1x1, 1x2, 2x1, 1x3, 3x1, 1x4, 4x1, 2x2
IMAGES = [(50, 50), (100, 40), (40, 100), (150, 40), (40, 150), (200, 40), (40, 200), (100, 100)]


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def image(size, seed=0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed + w * 31 + h).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf_model():
    from tiny_checkpoint import build_model

    model = build_model(seed=0)
    patch_meta_vision(model)
    return model


@pytest.fixture(scope="module")
def model_f32(gguf_f32):
    with mllama.Model(gguf_f32, n_image_slots=len(IMAGES)) as model:
        yield model


def test_every_tile_count_and_orientation_is_covered(model_f32):
    pre = [mllama.preprocess(image(s), model_f32) for s in IMAGES]
    assert {p.n_tiles for p in pre} == {1, 2, 3, 4}
    assert {p.aspect_ratio_id for p in pre} == set(range(1, 9))


@pytest.mark.parametrize("size", IMAGES, ids=[f"{w}x{h}" for w, h in IMAGES])
def test_vision_features_f32(model_f32, hf_model, size):
    pre = mllama.preprocess(image(size), model_f32)
    ours = model_f32.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)
    ref = vision_reference(hf_model, pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles)
    assert ours.shape == ref.shape == (4, 17, 96)
    assert nmse(ours, ref) <= 1e-6
    rows = pre.n_tiles * ours.shape[1]  # the image's own tiles: the others' K/V are zeros (the decoder masks them)
    for i, (k_ref, v_ref) in enumerate(cross_kv_reference(hf_model, ref)):
        k, v = model_f32.cross_kv(0, i)
        assert nmse(k[:rows], k_ref[:rows]) <= 1e-6 and nmse(v[:rows], v_ref[:rows]) <= 1e-6, i
        assert not k[rows:].any() and not v[rows:].any(), i


@pytest.mark.parametrize("size", IMAGES[:4], ids=[f"{w}x{h}" for w, h in IMAGES[:4]])
def test_vision_features_f16(converted, hf_model, size):
    with mllama.Model(converted("f16")) as model:
        pre = mllama.preprocess(image(size), model)
        ours = model.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)
        ref = vision_reference(hf_model, pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles)
        assert nmse(ours, ref) <= 1e-4
        rows = pre.n_tiles * ours.shape[1]
        for i, (k_ref, v_ref) in enumerate(cross_kv_reference(hf_model, ref)):
            k, v = model.cross_kv(0, i)
            assert nmse(k[:rows], k_ref[:rows]) <= 1e-4 and nmse(v[:rows], v_ref[:rows]) <= 1e-4
            assert not k[rows:].any() and not v[rows:].any()


def test_intermediate_layers_are_layer_inputs(model_f32):
    """Meta's convention: the test fails if the output-of-layer convention (transformers 5.23) is used."""
    from tiny_checkpoint import build_model

    unpatched = build_model(seed=0)
    patched = build_model(seed=0)
    patch_meta_vision(patched)
    pre = mllama.preprocess(image((100, 40)), model_f32)
    ours = model_f32.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)
    meta = vision_reference(patched, pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles)
    hf523 = vision_reference(unpatched, pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles)
    d = 32  # final block of channels is the same in both conventions; the rest are intermediates
    assert nmse(ours[..., :d], hf523[..., :d]) <= 1e-6
    assert nmse(ours[..., d:], meta[..., d:]) <= 1e-6
    assert nmse(ours[..., d:], hf523[..., d:]) > 1e-2


def test_slots_coexist(model_f32):
    feats = [model_f32.encode_image(image(s), slot=i) for i, s in enumerate(IMAGES[:3])]
    ks = [model_f32.cross_kv(i, 0)[0] for i in range(3)]
    again = model_f32.encode_image(image(IMAGES[0]), slot=0)
    assert np.array_equal(again, feats[0])
    assert np.array_equal(model_f32.cross_kv(1, 0)[0], ks[1]) and np.array_equal(model_f32.cross_kv(2, 0)[0], ks[2])
    assert not np.array_equal(ks[0], ks[1])


def test_bad_image_inputs(model_f32, tmp_path):
    with pytest.raises(mllama.ImageError):
        model_f32.encode_image(b"not an image")
    with pytest.raises(ValueError, match="image slot 99 out of range"):
        model_f32.encode_image(image((50, 50)), slot=99)
    pre = mllama.preprocess(image((50, 50)), model_f32)
    with pytest.raises(ValueError, match="has 1 tiles, got n_tiles 3"):
        model_f32.encode_pixels(pre.pixel_values, 1, 3)
    with pytest.raises(ValueError, match="pixel values"):
        model_f32.encode_pixels(pre.pixel_values[:2], 1, 1)


def test_dumps_match_transformers_hooks(gguf_f32, hf_model, tmp_path):
    ours_dir, ref_dir = tmp_path / "ours", tmp_path / "ref"
    with mllama.Model(gguf_f32, dump_dir=ours_dir, dump_filter=r"^(v|mm)\.") as model:
        pre = mllama.preprocess(image((100, 40)), model)
        model.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles)
    dumper = HookDumper(hf_model, ref_dir)
    try:
        vision_reference(hf_model, pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles)
        import torch

        with torch.no_grad():
            hf_model.model.multi_modal_projector(torch.from_numpy(np.load(ref_dir / "v.output.npy")))
    finally:
        dumper.close()
    results = compare(ours_dir, ref_dir, threshold=1e-6)
    names = {r.name for r in results}
    assert {"v.pre_ln", "v.blk.0.attn_out", "v.blk.2.out", "v.global.blk.0.ffn_out", "v.output", "mm.out"} <= names
    assert first_divergence(results) is None, [(r.name, r.nmse) for r in results if r.diverged]
    # a 2-tile image: our projector takes its two tiles, transformers' all four (the leading two compared)
    assert pre.n_tiles == 2 and [r.name for r in results if r.leading] == ["mm.out"]


def test_dump_tool_finds_an_injected_divergence(gguf_f32, tmp_path):
    from gguf_edit import rewrite

    def perturb(name, data, ttype):
        if name == "v.blk.1.attn_q.weight":
            data = data.copy()
            data[3, :] += 0.5
        return data, ttype

    broken = rewrite(gguf_f32, tmp_path / "perturbed.gguf", tensor_fn=perturb)
    img = image((100, 40))
    for path, folder in ((gguf_f32, tmp_path / "good"), (broken, tmp_path / "bad")):
        with mllama.Model(path, dump_dir=folder) as model:
            model.encode_image(img)
    results = compare(tmp_path / "bad", tmp_path / "good", threshold=1e-9)
    assert first_divergence(results).name == "v.blk.1.attn_out"
    assert all(not r.diverged for r in results[: results.index(first_divergence(results))])
    from mllama.dev.compare_dumps import main

    assert main([str(tmp_path / "bad"), str(tmp_path / "good")]) == 1
