"""The C ABI: plain-C header, ABI version, status codes, the shared name table."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import mllama
from mllama._native import names
from mllama._native.ffi import ffi, lib
from mllama.convert import tensor_map

ROOT = Path(__file__).resolve().parents[1]
HEADER_DIR = ROOT / "csrc" / "include"


def test_version_and_abi():
    assert mllama.__version__ == mllama.native_version()
    assert mllama.abi_version() == lib.MLLAMA_ABI_VERSION == 4


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_header_is_plain_c_and_links(tmp_path, gguf_f32):
    package_dir = Path(mllama.__file__).parent
    exe = tmp_path / "abi_smoke"
    subprocess.run(["cc", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", str(Path(__file__).parent / "c" / "abi_smoke.c"),
                    f"-I{HEADER_DIR}", f"-L{package_dir}", "-lmllama", f"-Wl,-rpath,{package_dir}", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe), str(gguf_f32)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "n_vocab=128256 n_vocab_embd=128264 n_layer=4 v_n_layer=3"


def test_every_status_has_a_name():
    for status in range(0, 9):
        assert ffi.string(lib.mllama_status_name(status)).decode() != "unknown status"


def test_converter_targets_exist_in_the_c_table():
    tables = [tensor_map._TEXT_GLOBAL, tensor_map._TEXT_LAYER, tensor_map._VISION_GLOBAL]
    ids = {i for table in tables for i in table.values()}
    ids |= {prefix + suffix for suffix in tensor_map._VISION_LAYER.values() for prefix in ("V_", "VG_")
            if prefix == "VG_" or suffix not in ("ATTN_GATE", "FFN_GATE")}
    c_tensors = names.tensors()
    assert ids <= set(c_tensors), ids - set(c_tensors)
    # and the loader's table has nothing the converter cannot produce, except optional tensors of other writers
    assert set(c_tensors) - ids == {"ROPE_FREQS", "V_TILE_POS_GATE"}


def test_every_written_name_is_in_the_table_and_loaded(gguf_f32):
    from gguf import GGUFReader

    reader = GGUFReader(gguf_f32)
    patterns = [re.compile("^" + re.escape(p).replace("%d", r"\d+") + "$") for p in names.tensors().values()]
    for t in reader.tensors:
        assert any(p.match(t.name) for p in patterns), t.name
    known_keys = set(names.keys().values())
    for key in reader.fields:
        if key.startswith("GGUF."):
            continue
        assert key in known_keys, key
    with mllama.Model(gguf_f32) as model:
        assert {t.name for t in model.tensors()} == {t.name for t in reader.tensors}


# Era-B Ollama names (Ollama 0.7.1+ convert/convert_mllama.go): the table keeps them where the meaning is
# the same, so Ollama files map onto the same loader.
OLLAMA_NAMES = [
    "token_embd.weight", "output.weight", "output_norm.weight", "rope_freqs.weight",
    "blk.%d.attn_norm.weight", "blk.%d.ffn_norm.weight", "blk.%d.ffn_gate.weight", "blk.%d.ffn_up.weight",
    "blk.%d.ffn_down.weight", "blk.%d.attn_q.weight", "blk.%d.attn_k.weight", "blk.%d.attn_v.weight",
    "blk.%d.attn_output.weight", "blk.%d.cross_attn_q_proj.weight", "blk.%d.cross_attn_k_proj.weight",
    "blk.%d.cross_attn_v_proj.weight", "blk.%d.cross_attn_o_proj.weight", "blk.%d.cross_attn_q_norm.weight",
    "blk.%d.cross_attn_k_norm.weight", "blk.%d.cross_attn_attn_gate", "blk.%d.cross_attn_mlp_gate",
    "mm.0.weight", "mm.0.bias", "v.class_embd", "v.patch_embd.weight", "v.position_embd.weight",
    "v.position_embd.gate", "v.tile_position_embd.weight", "v.pre_tile_position_embd.weight",
    "v.pre_tile_position_embd.gate", "v.post_tile_position_embd.weight", "v.post_tile_position_embd.gate",
    "v.pre_ln.weight", "v.pre_ln.bias", "v.post_ln.weight", "v.post_ln.bias", "v.blk.%d.attn_norm.weight",
    "v.blk.%d.attn_q.weight", "v.blk.%d.attn_output.weight", "v.blk.%d.ffn_up.weight", "v.blk.%d.ffn_down.bias",
    "v.global.blk.%d.attn_gate", "v.global.blk.%d.ffn_gate",
]


def test_names_follow_the_ollama_layout():
    table = set(names.tensors().values())
    assert set(OLLAMA_NAMES) <= table, set(OLLAMA_NAMES) - table
    assert names.key("CROSS_ATTENTION_LAYERS") == "mllama.attention.cross_attention_layers"
    assert names.key("V_INTERMEDIATE_LAYERS") == "mllama.vision.intermediate_layers_indices"
