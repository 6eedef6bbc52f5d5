"""The converter's peak memory stays far below the checkpoint size (tensor-by-tensor, row chunks)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mllama.dev.synthetic_checkpoint import write_synthetic_checkpoint
from test_server_load import ASAN_RSS_REASON, UNDER_ASAN
from tiny_checkpoint import TEXT_CONFIG, VISION_CONFIG

CHILD = textwrap.dedent("""
    import json, sys, mllama
    mllama.convert(sys.argv[1], sys.argv[2], type=sys.argv[3])
    # VmHWM is this process's own peak (ru_maxrss would include the parent's, inherited across exec)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024}))
""")


@pytest.mark.skipif(UNDER_ASAN, reason=ASAN_RSS_REASON)
def test_converter_peak_rss_is_well_under_checkpoint_size(hf_dir, tmp_path):
    text = {**TEXT_CONFIG, "hidden_size": 1536, "intermediate_size": 6144, "num_attention_heads": 12, "num_key_value_heads": 4}
    size = write_synthetic_checkpoint(tmp_path / "big", text, dict(VISION_CONFIG), tokenizer_from=hf_dir)
    assert size > 1e9
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "big.gguf"), "q8_0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
    import mllama
    import numpy as np

    with mllama.Model(tmp_path / "big.gguf") as model:  # the synthetic weights are sane random numbers
        for name in ("token_embd.weight", "blk.3.ffn_down.weight", "v.blk.0.attn_q.weight"):
            w = model.read_tensor(name)
            assert np.isfinite(w).all() and 0.5 < float(np.std(w)) * np.sqrt(w.shape[-1]) < 2.0, name
    print(f"checkpoint {size / 1e6:.0f} MB, converter peak RSS {peak / 1e6:.0f} MB ({peak / size:.2f}x)")
    assert peak < 0.25 * size
