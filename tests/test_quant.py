"""ggml's quantizer through the C ABI, checked against gguf-py's independent numpy codecs."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from mllama._native import dtypes as T


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "f16", "bf16"])
def test_decode_matches_gguf_py(name):
    ti = T.lookup(name)
    rows = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    data = T.encode(rows, ti)
    assert len(data) == 8 * ti.row_bytes(512)
    ours = T.decode(data, ti, rows.size)
    ref = quants.dequantize(np.frombuffer(data, dtype=np.uint8).reshape(8, -1), GGMLQuantizationType(ti.id))
    assert np.array_equal(ours, ref.reshape(-1))


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "bf16"])
def test_encode_matches_gguf_py_reference(name):
    ti = T.lookup(name)
    rows = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    ref = quants.quantize(rows, GGMLQuantizationType(ti.id))
    assert T.encode(rows, ti) == np.asarray(ref).tobytes()


def test_encode_rejects_partial_blocks():
    from mllama import ConversionError

    with pytest.raises(ConversionError, match="not a whole number"):
        T.encode(np.zeros((2, 100), np.float32), T.lookup("q4_k"))


def test_imatrix_types_are_not_writable():
    names = T.writable_type_names()
    assert "q4_k" in names and "q8_0" in names and "bf16" in names
    assert not any(n.startswith("iq") for n in names)
    assert "q8_1" not in names
