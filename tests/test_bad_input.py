"""Corrupt or wrong inputs raise specific, readable exceptions; none crashes the interpreter.

Each load runs in a child interpreter, so a crash (abort, segfault) fails the test instead of
killing the test run; the child reports the exception type and message on stdout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

import mllama
from mllama import ModelLoadError
from gguf_edit import rewrite

CHILD = textwrap.dedent("""
    import json, sys, mllama
    try:
        with mllama.Model(sys.argv[1]) as m:
            m.hparams
        print(json.dumps({"type": "ok", "message": ""}))
    except Exception as exc:
        print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
""")


def load_in_child(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expect_load_error(path: Path, *fragments: str) -> str:
    result = load_in_child(path)
    assert result["type"] == "ModelLoadError", result
    for fragment in fragments:
        assert fragment in result["message"], result["message"]
    return result["message"]


def test_small_fixture_loads(small_gguf):
    assert load_in_child(small_gguf) == {"type": "ok", "message": ""}


def test_missing_file(tmp_path):
    expect_load_error(tmp_path / "nope.gguf", "cannot open", "No such file")


def test_directory(tmp_path):
    expect_load_error(tmp_path, "not a regular file")


def test_empty_file(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    expect_load_error(tmp_path / "e.gguf", "not a GGUF file")


def test_flipped_magic(gguf_f32, tmp_path):
    data = bytearray(gguf_f32.read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    expect_load_error(tmp_path / "m.gguf", "bad magic")


@pytest.mark.parametrize("fraction", [0.0001, 0.3, 0.999])
def test_truncated_file(gguf_f32, tmp_path, fraction):
    data = gguf_f32.read_bytes()
    path = tmp_path / "t.gguf"
    path.write_bytes(data[: int(len(data) * fraction)])
    message = expect_load_error(path)
    assert "truncated" in message or "corrupt" in message


def test_tensor_with_wrong_shape(small_gguf, tmp_path):
    def reshape(name, data, ttype):
        if name == "blk.2.attn_q.weight":
            return data[:32].copy(), ttype
        return data, ttype

    path = rewrite(small_gguf, tmp_path / "s.gguf", tensor_fn=reshape)
    expect_load_error(path, "blk.2.attn_q.weight", "shape [64, 32]", "expected [64, 64]")


@pytest.mark.parametrize("tensor", ["blk.3.cross_attn_k_norm.weight", "v.global.blk.0.ffn_gate", "output.weight"])
def test_missing_tensor(small_gguf, tmp_path, tensor):
    path = rewrite(small_gguf, tmp_path / "d.gguf", drop={tensor})
    expect_load_error(path, f"missing tensor '{tensor}'")


def test_unsupported_tensor_type(small_gguf, tmp_path):
    def to_f16(name, data, ttype):
        if name == "blk.0.attn_norm.weight":
            return data.astype(np.float16), GGMLQuantizationType.F16
        return data, ttype

    path = rewrite(small_gguf, tmp_path / "u.gguf", tensor_fn=to_f16)
    expect_load_error(path, "blk.0.attn_norm.weight", "unsupported type f16")


def test_non_mllama_gguf(small_gguf, tmp_path):
    path = rewrite(small_gguf, tmp_path / "l.gguf", keys={"general.architecture": "llama"})
    expect_load_error(path, "not an mllama model", "'llama'")


def test_missing_hparam(small_gguf, tmp_path):
    path = rewrite(small_gguf, tmp_path / "k.gguf", drop_keys={"mllama.vision.patch_size"})
    expect_load_error(path, "missing metadata key 'mllama.vision.patch_size'")


def test_inconsistent_hparam(small_gguf, tmp_path):
    path = rewrite(small_gguf, tmp_path / "h.gguf", keys={"mllama.attention.head_count": 3})
    expect_load_error(path, "not a multiple of head_count")


def test_unknown_convention_is_refused(small_gguf, tmp_path):
    path = rewrite(small_gguf, tmp_path / "o.gguf", keys={"mllama.weights.convention": "permuted"})
    expect_load_error(path, "uses weight convention 'permuted'")


def test_text_only_file_needs_its_projector(small_gguf, tmp_path):
    drop = {n for n in ("v.patch_embd.weight",)}
    path = rewrite(small_gguf, tmp_path / "t.gguf", drop=drop, drop_keys={"mllama.weights.convention"})
    expect_load_error(path, "without its vision projector")


def test_error_status_is_exposed(tmp_path):
    import mllama

    with pytest.raises(mllama.ModelLoadError) as info:
        mllama.Model(tmp_path / "missing.gguf")
    assert info.value.status == "i/o error"


def test_unknown_device_is_a_clear_error(gguf_f32):
    import mllama

    with pytest.raises(mllama.ModelLoadError, match="unknown device 'tpu9'"):
        mllama.Model(gguf_f32, device="tpu9")


def test_closed_model_raises(gguf_f32):
    import mllama
    from mllama import ModelClosedError

    model = mllama.Model(gguf_f32)
    model.close()
    model.close()  # idempotent
    with pytest.raises(ModelClosedError):
        model.hparams


def test_convert_without_config_in_child(tmp_path):
    (tmp_path / "hf").mkdir()
    code = ("import mllama, sys\n"
            "try:\n    mllama.convert(sys.argv[1], sys.argv[2])\n"
            "except mllama.ConversionError as e:\n    print('ConversionError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), str(tmp_path / "o.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ConversionError:" in proc.stdout and "config.json is missing" in proc.stdout


def test_unknown_cpu_kernel_is_refused_by_name(small_gguf):
    import mllama

    with pytest.raises(mllama.ModelLoadError, match=r"unknown CPU kernel 'bogus' in cpu_kernels 'attn,bogus'"):
        mllama.Model(small_gguf, cpu_kernels="attn,bogus")


def test_rpc_asked_of_a_ggml_without_rpc_is_a_clear_error(small_gguf):
    """Runs where ggml lacks its RPC backend (the prebuilt wheel); CI's ggml has it (tests/test_rpc.py)."""
    import mllama
    from mllama._native.placement import rpc_supported

    if rpc_supported():
        pytest.skip("this ggml has its RPC backend: tests/test_rpc.py covers it")
    with pytest.raises(mllama.ModelLoadError, match="GGML_RPC=ON"):
        mllama.Model(small_gguf, rpc=["127.0.0.1:50052"])
    result = subprocess.run([sys.executable, "-m", "mllama", "rpc-server", "--port", "50052"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "GGML_RPC=ON" in result.stderr


def test_rpc_server_host_and_cache_arguments(tmp_path, monkeypatch):
    """ggml's RPC server binds a numeric IPv4 address: a name is resolved, IPv6 refused; --cache is made (with its
    parents, "~" expanded) and a file of the user's in its place is refused, untouched."""
    from mllama.cli.rpc_server import bind_address, cache_directory

    assert bind_address("localhost") == "127.0.0.1" and bind_address("0.0.0.0") == "0.0.0.0"
    for host in ("::1", "[::1]", "no-such-host.invalid", ""):
        with pytest.raises(ValueError, match=r"^--host .*IPv4"):
            bind_address(host)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_directory("~/cache/rpc") == str(tmp_path / "cache" / "rpc") and (tmp_path / "cache/rpc").is_dir()
    assert cache_directory("~/cache/rpc") == str(tmp_path / "cache" / "rpc") and cache_directory(None) is None
    (tmp_path / "mine").write_text("my file")
    with pytest.raises(ValueError, match="not a directory"):
        cache_directory(str(tmp_path / "mine"))
    assert (tmp_path / "mine").read_text() == "my file"


def test_repack_modes_and_bad_values(gguf_f32, monkeypatch):
    """Model(repack=...) and MLLAMA_REPACK take True/1, False/0 or "amx" (ggml's AMX layout too: settings.repack_mode);
    anything else is a ValueError that names where it came from, before anything is loaded."""
    import mllama
    from mllama.settings import repack_mode

    assert [repack_mode(v) for v in (True, False, "1", "0", " AMX ", 2, "2", "true", "False")] == [1, 0, 1, 0, 2, 2, 2,
                                                                                                 1, 0]
    with pytest.raises(ValueError, match=r"^repack must be 1 \(true\), 0 \(false\) or amx \(2\), not 'yes'"):
        mllama.Model(gguf_f32, n_ctx=256, repack="yes")
    monkeypatch.setenv("MLLAMA_REPACK", "on")
    with pytest.raises(ValueError, match=r"^MLLAMA_REPACK must be .* not 'on'"):
        mllama.Model(gguf_f32, n_ctx=256)
    monkeypatch.setenv("MLLAMA_IMAGE_CACHE_BYTES", "lots")
    with mllama.Model(gguf_f32, n_ctx=256, repack=0, image_cache_bytes="1M") as model:  # the keywords win: unread
        assert model.image_cache.max_bytes == 1 << 20  # (a bad variable had failed the Model anyway)
    monkeypatch.delenv("MLLAMA_IMAGE_CACHE_BYTES")
    monkeypatch.setenv("MLLAMA_REPACK", "amx")
    with mllama.Model(gguf_f32, n_ctx=256) as model:
        assert model.forward([128000, 9906]).shape[-1] == model.hparams.n_vocab


def test_mllama_device_is_the_default_device(gguf_f32, monkeypatch):
    """MLLAMA_DEVICE places a Model that names no device (the suite runs with it set to cpu: conftest.py); an
    explicit device wins; a name no backend offers is a ModelLoadError that names the variable and lists the
    devices there are."""
    import mllama

    monkeypatch.setenv("MLLAMA_DEVICE", "cpu")
    with mllama.Model(gguf_f32, n_ctx=256) as model:
        assert (model.placement[0].component, model.placement[0].reason) == ("vision", 'device="cpu"')
    monkeypatch.setenv("MLLAMA_DEVICE", "NoSuchDevice0")
    with pytest.raises(mllama.ModelLoadError, match=r"^MLLAMA_DEVICE: unknown device 'NoSuchDevice0' \(available: .*CPU"):
        mllama.Model(gguf_f32, n_ctx=256)
    with mllama.Model(gguf_f32, n_ctx=256, device="auto") as model:
        assert model.placement[0].reason.startswith("auto: ")


@pytest.mark.parametrize("variables, error, fragment", [
    ({"MLLAMA_PROFILE": "{tmp}/no/such/folder/p.tsv"}, ValueError, "MLLAMA_PROFILE: "),
    ({"MLLAMA_PROFILE": "{tmp}"}, ValueError, "MLLAMA_PROFILE: "),  # a folder: nothing was written, nothing said
    ({"MLLAMA_DUMP_DIR": "{tmp}/a_file"}, ValueError, "MLLAMA_DUMP_DIR: cannot make the folder"),
    ({"MLLAMA_CPU_KERNELS": "garbage"}, ModelLoadError, "MLLAMA_CPU_KERNELS: unknown CPU kernel 'garbage'"),
    ({"MLLAMA_DUMP_DIR": "{tmp}/dumps", "MLLAMA_DUMP_FILTER": "("}, ModelLoadError, "MLLAMA_DUMP_FILTER: invalid"),
    ({"MLLAMA_IMAGE_CACHE_DIR": "{tmp}/a_file"}, ValueError, "MLLAMA_IMAGE_CACHE_DIR: "),
    ({"MLLAMA_RPC": "127.0.0.1:1,localhost"}, ValueError, "MLLAMA_RPC: 'localhost' is not host:port"),
])
def test_bad_settings_name_their_variable(small_gguf, tmp_path, monkeypatch, variables, error, fragment):
    (tmp_path / "a_file").write_text("not a folder")
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    with pytest.raises(error, match=re.escape(fragment)):
        mllama.Model(small_gguf, n_ctx=64)


def test_cpu_kernels_as_numbers_and_lists_that_name_none(gguf_f32):
    """cpu_kernels=0 is "0" (0 had been read as no value: every kernel on), 1 is "1"; "," names no kernel."""
    import mllama

    paths = {}
    for value in ("0", 0, False, "1", 1, True):
        with mllama.Model(gguf_f32, n_ctx=64, cpu_kernels=value) as model:
            paths[value] = model.op_paths()
    assert paths["0"] == paths[0] == paths[False] and paths["1"] == paths[1] == paths[True]
    from mllama._native.cpu_features import ggml_features

    if ggml_features().get("AVX2_KERNELS") == "1":  # (elsewhere ggml's ops either way)
        assert paths["0"] != paths["1"]
    with pytest.raises(mllama.ModelLoadError, match="cpu_kernels ',' names no kernel"):
        mllama.Model(gguf_f32, n_ctx=64, cpu_kernels=",")
    with pytest.raises(TypeError, match="cpu_kernels must be a string"):
        mllama.Model(gguf_f32, n_ctx=64, cpu_kernels=0.5)


def test_profile_that_cannot_be_written_or_next_to_dumps(gguf_f32, tmp_path):
    """Both had written no profile and said nothing."""
    import mllama

    with pytest.raises(ValueError, match="profile and dump_dir cannot both be set"):
        mllama.Model(gguf_f32, n_ctx=64, profile=tmp_path / "p.tsv", dump_dir=tmp_path / "dumps")
    if sys.platform.startswith("linux"):  # (a folder nobody may write into, even root)
        with pytest.raises(ValueError, match="profile: cannot write /proc/self/p.tsv"):
            mllama.Model(gguf_f32, n_ctx=64, profile="/proc/self/p.tsv")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a file name that is not UTF-8 (macOS refuses one)")
def test_a_model_file_name_that_is_not_utf8(gguf_f32, tmp_path):
    """Loaded as the OS names it (the image cache's identity had raised UnicodeEncodeError on its surrogates)."""
    import os

    import mllama

    name = os.path.join(os.fsencode(tmp_path), b"mod\xe8le.gguf")
    os.symlink(os.fsencode(gguf_f32), name)
    with mllama.Model(os.fsdecode(name), n_ctx=64) as model:
        assert model.image_cache is not None and model.forward([128000]).shape[-1] == model.hparams.n_vocab


def test_auto_sequences_count_the_caches_at_their_precision(converted, gguf_f32, monkeypatch):
    """"auto" n_seq_max fits the self-attention caches in a quarter of the free memory at the precision the context
    gives them (an F32 model's caches are F32: F16 had been assumed, which took half); where the OS does not say
    what is free (macOS: no SC_AVPHYS_PAGES), half the physical memory counts as free."""
    import os

    import mllama
    from mllama._native import context_params
    from mllama._native.ffi import ffi, last_error, lib

    with mllama.Model(gguf_f32, n_ctx=64) as model:
        hp = model.hparams
        n_self = hp.n_layer - len(hp.cross_attention_layers)
        per_seq_f32 = n_self * 2 * 256 * hp.n_head_kv * hp.n_embd_head * 4
        monkeypatch.setattr(context_params, "free_memory", lambda: 4 * 2 * per_seq_f32)  # a quarter: 2 F32 caches
        handle = model._handle()
        assert [context_params.auto_sequences(handle, 256, kv) for kv in (-1, 1, 0)] == [2, 2, 4]
        # the C side says which type the context gives the caches (F32: 0, F16: 1 in ggml's numbers)
        assert [lib.mllama_model_cache_type(handle, kv) for kv in (-1, 1, 0)] == [0, 0, 1]
        assert lib.mllama_model_cache_type(handle, 2) == -1 and "precision" in last_error()
        assert lib.mllama_model_cache_type(ffi.NULL, 0) == -1 and "null model" in last_error()
    with mllama.Model(converted("f16"), n_ctx=64) as model:  # an F16 output matrix: F16 caches
        assert [lib.mllama_model_cache_type(model._handle(), kv) for kv in (-1, 1, 0)] == [1, 0, 1]
    monkeypatch.undo()
    sysconf = os.sysconf

    def like_macos(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return sysconf(name)
    monkeypatch.setattr(os, "sysconf", like_macos)
    assert context_params.free_memory() == sysconf("SC_PHYS_PAGES") * sysconf("SC_PAGE_SIZE") // 2
