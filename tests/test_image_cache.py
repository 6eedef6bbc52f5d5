"""The image cache: an image slot saved and restored bit for bit (mllama_context_get/set_slot_state),
foreign and damaged blobs refused, the in-memory LRU under its byte budget, and the disk directory
shared by Models and processes (a hit skips the vision tower: the engine's encode count and the
per-op profile say so), with damaged files ignored and replaced."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import mllama
from mllama._native.slot_state import get_slot_state, set_slot_state, slot_state_info
from mllama.generation.image_cache import ImageCache
from mllama.settings import parse_bytes

SIZES = {"4 tiles": (100, 100), "1 tile": (50, 50)}  # at the fixture's 56-pixel tiles


def picture(size, seed=0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def prompt(model) -> list[int]:
    hp = model.hparams
    return [hp.bos_token_id, hp.image_token_id, 300, 400, 500]


def forward_fresh(model, image) -> np.ndarray:
    """Logits with the image placed anew (the engine forgets what its slots hold)."""
    model.engine.slot_keys[:] = [None] * len(model.engine.slot_keys)
    return model.forward(prompt(model), [image])


@pytest.fixture(scope="module")
def model(small_gguf):
    with mllama.Model(small_gguf, n_image_slots=2, image_cache_bytes=0) as m:
        assert m.image_cache is None  # no budget and no directory: off
        yield m


@pytest.mark.parametrize("kind", list(SIZES))
def test_slot_state_round_trip_is_bit_identical(model, kind):
    pre = mllama.preprocess(picture(SIZES[kind]), model)
    model.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)
    blob = get_slot_state(model._ctx, 0)
    info = slot_state_info(model._ctx)
    hp = model.hparams
    assert info["n_cross_layer"] == len(hp.cross_attention_layers) and info["max_tiles"] == hp.v_max_tiles
    per_tile = hp.v_n_positions * hp.n_head_kv * hp.n_embd_head * 4  # F32 slots of an F32 model
    assert len(blob) == info["max_size"] - (hp.v_max_tiles - pre.n_tiles) * 2 * info["n_cross_layer"] * per_tile
    model.encode_pixels(pre.pixel_values[:, ::-1].copy(), pre.aspect_ratio_id, pre.n_tiles, slot=1)  # other data
    set_slot_state(model._ctx, 1, blob)
    rows = pre.n_tiles * hp.v_n_positions
    for i in range(info["n_cross_layer"]):
        (k0, v0), (k1, v1) = model.cross_kv(0, i), model.cross_kv(1, i)
        assert np.array_equal(k0[:rows], k1[:rows]) and np.array_equal(v0[:rows], v1[:rows])
        assert not k1[rows:].any() and not v1[rows:].any()  # tiles the image lacks: zero (masked anyway)
    assert bytes(get_slot_state(model._ctx, 1)) == bytes(blob)


def test_the_blob_is_the_same_whatever_the_caches_layout(small_gguf, monkeypatch):
    """F16 image caches are head-major where the AVX2 form of our cross-attention kernel reads them, key-major under
    ggml's attention (runtime/context.h): the same encode reads back the same from both, and the blob, which holds
    the rows key-major either way, moves between the two bit for bit."""
    monkeypatch.setenv("MLLAMA_AVX512", "0")  # our kernel's AVX2 form wherever it runs at all
    common = dict(n_image_slots=2, image_cache_bytes=0, cross_kv_f32=False)
    every_but_xattn = "attn,gemm,gelu,qmm,amx,fuse"  # the same encode in both
    with mllama.Model(small_gguf, **common) as ours, mllama.Model(small_gguf, cpu_kernels=every_but_xattn,
                                                                 **common) as plain:
        pre = mllama.preprocess(picture(SIZES["1 tile"], seed=5), ours)
        layout = ours.op_paths()["cross-attention"]
        if not layout.startswith("mllama"):
            pytest.skip("no AVX2 kernels on this CPU: every image cache is key-major")
        assert "head-major" in layout and "head-major" not in plain.op_paths()["cross-attention"]
        n_cross = slot_state_info(ours._ctx)["n_cross_layer"]
        rows = pre.n_tiles * ours.hparams.v_n_positions
        for m in (ours, plain):  # the same image encoded into slot 1 of each reads back the same
            m.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=1)
        for i in range(n_cross):
            assert all(np.array_equal(a, b) for a, b in zip(ours.cross_kv(1, i), plain.cross_kv(1, i)))
        for src, dst in ((ours, plain), (plain, ours)):  # slot 1 of one into slot 0 of the other
            blob = get_slot_state(src._ctx, 1)
            set_slot_state(dst._ctx, 0, blob)
            assert bytes(get_slot_state(dst._ctx, 0)) == bytes(blob)
            for i in range(n_cross):
                (k1, v1), (k0, v0) = src.cross_kv(1, i), dst.cross_kv(0, i)
                assert np.array_equal(k0, k1) and np.array_equal(v0, v1)
                assert k1[:rows].any() and not k1[rows:].any() and not v0[rows:].any()


@pytest.mark.parametrize("kind", list(SIZES))
def test_a_hit_gives_the_same_logits_and_skips_the_encoder(small_gguf, model, kind):
    image = picture(SIZES[kind], seed=1)
    want = forward_fresh(model, image)
    with mllama.Model(small_gguf, n_image_slots=2) as cached:
        cache = cached.image_cache
        info = slot_state_info(cached._ctx)
        assert cache.max_bytes == 4 * info["max_size"] and cache.directory is None  # the default budget
        first = forward_fresh(cached, image)
        second = forward_fresh(cached, image)
        assert cached.engine.n_encoded == 1
        assert (cache.stats.misses, cache.stats.memory_hits, cache.stats.stores) == (1, 1, 1)
    assert np.array_equal(first, want) and np.array_equal(second, want)


def test_a_different_image_is_a_miss(small_gguf):
    with mllama.Model(small_gguf, n_image_slots=1) as m:
        forward_fresh(m, picture((100, 100), seed=2))
        forward_fresh(m, picture((100, 100), seed=3))
        forward_fresh(m, picture((100, 100), seed=2))
        assert m.engine.n_encoded == 2
        assert (m.image_cache.stats.misses, m.image_cache.stats.memory_hits) == (2, 1)


def test_lru_eviction_keeps_the_byte_budget(small_gguf):
    with mllama.Model(small_gguf, n_image_slots=1) as m:
        size = slot_state_info(m._ctx)["max_size"]  # every image here has 4 tiles
        cache = ImageCache("lru", max_bytes=int(2.5 * size))
        m.engine.image_cache = cache
        images = [m.prepare_images([picture((100, 100), seed=10 + i)])[0] for i in range(3)]
        for im in images[:2]:
            m.engine.encode(0, im)
        assert cache.load_into(m._ctx, 0, images[0].key)  # image 0 is now the most recently used
        m.engine.encode(0, images[2])                      # evicts image 1, the least recently used
        assert len(cache) == 2 and cache.nbytes == 2 * size <= cache.max_bytes and cache.stats.evictions == 1
        assert cache.load_into(m._ctx, 0, images[0].key) and cache.load_into(m._ctx, 0, images[2].key)
        assert not cache.load_into(m._ctx, 0, images[1].key)
        small = ImageCache("small", max_bytes=size - 1)  # a blob bigger than the budget is not kept
        m.engine.image_cache = small
        m.engine.encode(0, images[0])
        assert len(small) == 0 and small.nbytes == 0 and not small.load_into(m._ctx, 0, images[0].key)
        assert (small.stats.stores, cache.stats.stores) == (0, 3)  # (a blob not kept is not counted as stored)


def test_a_second_model_with_the_same_directory_skips_the_vision_tower(small_gguf, tmp_path):
    folder, image = tmp_path / "cache", picture((100, 100), seed=4)
    folder.mkdir()
    folder.chmod(0o755)  # a directory others may read: so may they its files (mkstemp's 0600 kept them out)
    with mllama.Model(small_gguf, image_cache_dir=folder, profile=tmp_path / "a.tsv") as a:
        want = forward_fresh(a, image)
        assert a.engine.n_encoded == 1 and a.image_cache.stats.stores == 1
    files = list(folder.iterdir())
    assert len(files) == 1 and re.fullmatch(r"[0-9a-f]{64}\.mlslot", files[0].name)  # no temp file left
    assert files[0].stat().st_mode & 0o777 == 0o644
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # (/tmp-like: its entries had been 0666, any account could rewrite them)
    with mllama.Model(small_gguf, image_cache_dir=shared, image_cache_bytes="0") as c:
        forward_fresh(c, image)
    assert [f.stat().st_mode & 0o777 for f in shared.iterdir()] == [0o644]
    with mllama.Model(small_gguf, image_cache_dir=folder, image_cache_bytes="0", profile=tmp_path / "b.tsv") as b:
        got = forward_fresh(b, image)
        assert b.engine.n_encoded == 0 and b.image_cache.stats.disk_hits == 1
    assert np.array_equal(got, want)
    ops = {name: {line.split("\t")[4].split()[0] for line in (tmp_path / name).read_text().splitlines()[1:-1]}
           for name in ("a.tsv", "b.tsv")}
    assert "IM2COL" in ops["a.tsv"] and "IM2COL" not in ops["b.tsv"]  # the patch embedding ran only in a


def damage(kind: str, path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "empty", "garbage", "foreign layout"])
def test_damaged_disk_files_are_ignored_and_replaced(small_gguf, model, tmp_path, kind):
    folder, image = tmp_path / "cache", picture((100, 100), seed=5)
    with mllama.Model(small_gguf, image_cache_dir=folder, cross_kv_f32=False) as f16:  # F16 slots: another layout
        forward_fresh(f16, image)
        foreign = get_slot_state(f16._ctx, 0)
    with mllama.Model(small_gguf, image_cache_dir=folder) as m:
        want = forward_fresh(m, image)
        path = m.image_cache.path_for(m.prepare_images([image])[0].key)
        valid = path.read_bytes()
        if kind == "foreign layout":  # a well-formed file under this model's key, but an F16 blob
            m.image_cache._write_file(m.image_cache.entry_key(m.prepare_images([image])[0].key), foreign)
        else:
            damage(kind, path)
    with mllama.Model(small_gguf, image_cache_dir=folder) as m:
        assert np.array_equal(forward_fresh(m, image), want)
        assert m.engine.n_encoded == 1 and m.image_cache.stats.bad_files == 1 and m.image_cache.stats.disk_hits == 0
    assert path.read_bytes() == valid  # replaced by a good entry
    with mllama.Model(small_gguf, image_cache_dir=folder) as m:
        forward_fresh(m, image)
        assert m.engine.n_encoded == 0 and m.image_cache.stats.disk_hits == 1


def test_an_unwritable_directory_does_not_stop_encoding(small_gguf, tmp_path):
    folder = tmp_path / "cache"
    with mllama.Model(small_gguf, image_cache_dir=folder) as m:
        folder.rmdir()
        folder.write_text("not a directory any more")  # the user's file: never touched
        forward_fresh(m, picture((50, 50), seed=6))
        assert m.image_cache.stats.write_errors == 1 and m.engine.n_encoded == 1
    assert folder.read_text() == "not a directory any more"
    with pytest.raises(ValueError, match=f"image cache directory {folder}: not a directory$"):  # (had: File exists)
        mllama.Model(small_gguf, image_cache_dir=folder)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A model of other dimensions (kv heads, head size, one cross layer, 28-pixel tiles)."""
    from test_synthetic_and_profile import TEXT, VISION

    from mllama.dev.synthetic_gguf import write_synthetic_gguf

    path = write_synthetic_gguf(tmp_path_factory.mktemp("other") / "o.gguf", TEXT, VISION, type="q8_0",
                                vision_type="f16")
    with mllama.Model(path, n_image_slots=1) as m:
        yield m


def test_a_blob_of_another_model_is_refused(model, other_model):
    other = other_model.prepare_images([picture((100, 100))])[0]
    other_model.engine.encode(0, other)
    blob = get_slot_state(other_model._ctx, 0)
    with pytest.raises(ValueError, match=r"slot state made for 1 cross layers x 2 kv heads x 64 dims.*"
                                         r"this context's slots are 2 cross layers"):
        set_slot_state(model._ctx, 0, blob)
    pre = mllama.preprocess(picture((100, 100)), model)
    model.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)  # whatever ran before
    with pytest.raises(ValueError, match="made for"):
        set_slot_state(other_model._ctx, 0, get_slot_state(model._ctx, 0))


def header_edit(blob: bytearray, offset: int, value: int) -> bytearray:
    out = bytearray(blob)
    out[offset:offset + 4] = int(value).to_bytes(4, "little", signed=True)
    return out


def test_bad_blobs_and_arguments_are_refused_with_a_reason(model):
    pre = mllama.preprocess(picture((100, 40)), model)  # 1x2 tiles
    model.encode_pixels(pre.pixel_values, pre.aspect_ratio_id, pre.n_tiles, slot=0)
    blob = get_slot_state(model._ctx, 0)
    bad = {
        "shorter than its": blob[:20],
        "not a slot state": b"X" + blob[1:],
        "format version 7": header_edit(blob, 8, 7),
        "slot state made for": header_edit(blob, 20, 3),               # n_head_kv
        "aspect ratio id 1 with 2 tiles": header_edit(blob, 40, 1),    # (1, 1) holds one tile, not two
        "aspect ratio id 99": header_edit(blob, 40, 99),
        "expected for 4 tiles": header_edit(header_edit(blob, 36, 4), 40, 6),  # (2, 2): the size is of 2 tiles
        "bytes; ": blob[:-1],
    }
    for reason, data in bad.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            set_slot_state(model._ctx, 1, data)
    set_slot_state(model._ctx, 1, blob + b"")  # the good one still goes in
    with pytest.raises(ValueError, match="bytes; "):
        set_slot_state(model._ctx, 1, blob + b"\0")
    with pytest.raises(ValueError, match="out of range"):
        set_slot_state(model._ctx, 2, blob)
    with pytest.raises(ValueError, match="out of range"):
        get_slot_state(model._ctx, -1)
    from mllama._native.ffi import ffi, lib

    n = ffi.new("uint64_t *")
    assert lib.mllama_context_set_slot_state(model._ctx, 0, ffi.NULL, 10) == lib.MLLAMA_ERR_INVALID_ARGUMENT
    assert lib.mllama_context_get_slot_state(ffi.NULL, 0, ffi.NULL, 0, n) == lib.MLLAMA_ERR_INVALID_ARGUMENT
    assert lib.mllama_context_get_slot_state(model._ctx, 0, ffi.new("char[]", 8), 8, n) == \
        lib.MLLAMA_ERR_INVALID_ARGUMENT and b"needs" in ffi.string(lib.mllama_last_error())


def test_an_empty_slot_has_no_state(small_gguf):
    with mllama.Model(small_gguf, n_image_slots=1) as m:
        with pytest.raises(ValueError, match="holds no image"):
            get_slot_state(m._ctx, 0)


def test_settings_and_keyword_arguments(small_gguf, monkeypatch, tmp_path):
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2GiB") == 2 << 30 and parse_bytes(1000) == 1000
    for text in ("", "-1", "1.5G", "lots"):
        with pytest.raises(ValueError, match="not a byte count"):
            parse_bytes(text)
    monkeypatch.setenv("MLLAMA_IMAGE_CACHE_BYTES", "3M")
    monkeypatch.setenv("MLLAMA_IMAGE_CACHE_DIR", str(tmp_path / "env"))
    with mllama.Model(small_gguf) as m:
        assert m.image_cache.max_bytes == 3 << 20 and m.image_cache.directory == tmp_path / "env"
    with mllama.Model(small_gguf, image_cache_bytes=0, image_cache_dir="") as m:
        assert m.image_cache is None  # keyword arguments win
    with mllama.Model(small_gguf, n_image_slots=0) as m:
        assert m.image_cache is None
    monkeypatch.setenv("MLLAMA_IMAGE_CACHE_BYTES", "a lot")
    with pytest.raises(ValueError, match="MLLAMA_IMAGE_CACHE_BYTES"):
        mllama.Model(small_gguf)


def test_the_key_changes_with_the_model_file(small_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copy2(small_gguf, copy)

    def key(path) -> str:
        with mllama.Model(path) as m:
            return m.image_cache.entry_key("an image")

    original, copied = key(small_gguf), key(copy)
    os.utime(copy, ns=(1, 1))  # as if rewritten: another mtime
    assert len({original, copied, key(copy)}) == 3 and key(small_gguf) == original


def test_an_entry_that_gives_non_finite_logits_is_dropped(gguf_f32, tmp_path):
    """A disk entry whole by its header (its digest recomputed over a bad blob: another writer, a broken build)
    makes the request fail once with the reason, then is gone: memory, disk, the slot, the sequences' rows."""
    import hashlib

    from mllama.generation import image_cache

    folder, image, greedy = tmp_path / "cache", picture((100, 100), seed=6), {"max_tokens": 3, "temperature": 0.0}
    with mllama.Model(gguf_f32, image_cache_dir=folder) as m:
        want = m.describe(image, **greedy)
        path = m.image_cache.path_for(m.prepare_images([image])[0].key)
    data, header = path.read_bytes(), image_cache._HEADER
    magic, version, key, _, n = header.unpack_from(data)
    blob = bytearray(data[header.size:])
    blob[n // 2:] = b"\xff" * (n - n // 2)  # NaN in F32 and F16 alike
    path.write_bytes(header.pack(magic, version, key, hashlib.sha256(blob).digest(), n) + bytes(blob))
    with mllama.Model(gguf_f32, image_cache_dir=folder) as m:
        with pytest.raises(mllama.MllamaError, match="non-finite logits"):
            m.describe(image, **greedy)
        assert m.image_cache.stats.disk_hits == 1 and not path.exists() and len(m.image_cache) == 0
        assert m.describe(image, **greedy) == want  # encoded again: neither the slot nor a sequence's rows reused
        assert m.engine.n_encoded == 1
    assert path.exists()  # the good entry written back
