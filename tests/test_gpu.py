"""The CUDA (or any GPU) path against the CPU on the tiny fixture: vision features, logits over a
prompt with images, and a partial offload keeping the vision tower on the GPU.

Skipped where ggml offers no GPU device (CI, a CPU-only build). On a GPU machine, after the
README's CUDA install: `python -m pytest tests/test_gpu.py -q`."""

from __future__ import annotations

import pytest

import mllama
from test_text import CASES, nmse

GPUS = [d for d in mllama.devices() if d["type"] in ("gpu", "igpu")]
pytestmark = pytest.mark.skipif(not GPUS, reason="no GPU device in the loaded ggml")


def run(path, device, case, **kwargs):
    with mllama.Model(path, device=device, n_ctx=512, **kwargs) as model:
        tokens, images = model.chat_prompt(CASES[case])
        pre = [mllama.preprocess(im, model) for im in images]
        feats = [model.encode_pixels(p.pixel_values, p.aspect_ratio_id, p.n_tiles) for p in pre]
        logits = model.forward(tokens, images)
        buffers = {t.name: t.buffer for t in model.tensors()}
        return feats, logits, buffers, model.info


# ggml runs F32 products through cuBLAS with TF32 tensor-core math (CUBLAS_TF32_TENSOR_OP_MATH on its handles):
# the products' inputs are rounded to 10-bit mantissas, F16's, so F32 weights get the F16 bound on a GPU
# (seen on an H200: logits 4.1e-6 for F32, where the CPU's F32 arithmetic alone would give ~1e-12).
@pytest.mark.parametrize("type_name,bound", [("f32", 1e-4), ("f16", 1e-4), ("q8_0", 1e-3)])
@pytest.mark.parametrize("case", ["b_4_tiles", "c_two_images"])
def test_gpu_matches_cpu(converted, type_name, bound, case):
    path = converted(type_name)
    cpu_feats, cpu_logits, _, _ = run(path, "cpu", case)
    gpu_feats, gpu_logits, buffers, info = run(path, GPUS[0]["name"], case)
    assert info["device"] == GPUS[0]["name"]
    assert all(not b.startswith("CPU") for name, b in buffers.items() if name.startswith("v."))
    assert len(gpu_feats) == len(cpu_feats) > 0
    for ours, ref in zip(gpu_feats, cpu_feats):
        assert nmse(ours, ref) <= bound
    assert nmse(gpu_logits, cpu_logits) <= bound


def test_partial_offload_keeps_the_vision_tower_on_the_gpu(converted):
    path = converted("f16")
    _, cpu_logits, _, _ = run(path, "cpu", "b_4_tiles")
    _, logits, buffers, info = run(path, GPUS[0]["name"], "b_4_tiles", n_gpu_layers=1)
    assert info["n_gpu_layers"] == 1
    assert all(not b.startswith("CPU") for name, b in buffers.items() if name.startswith(("v.", "mm.")))
    assert any(b.startswith("CPU") for name, b in buffers.items() if name.startswith("blk.0."))
    assert nmse(logits, cpu_logits) <= 1e-4


def test_no_mllama_cpu_kernel_on_a_gpu_context(converted):
    """Our kernels are CPU custom ops: a GPU context (full or partial offload) uses none of them."""
    for n_gpu_layers in (-1, 1):
        with mllama.Model(converted("f16"), device=GPUS[0]["name"], n_gpu_layers=n_gpu_layers) as model:
            paths = model.op_paths()
        assert paths["device"].startswith(GPUS[0]["name"]) and "never used" in paths["device"]
        assert not any(path.startswith("mllama") for path in paths.values())


def test_an_encode_in_steps_on_the_gpu_equals_one_encode(converted):
    """The tower's state kept between steps on the GPU (runtime/encode_steps.cpp): the same kernels on the same
    inputs as one whole encode, so the slot holds the same bits."""
    from mllama._native.slot_state import get_slot_state
    from test_encode_steps import SIZES, picture, run_in_steps

    with mllama.Model(converted("f16"), device=GPUS[0]["name"], n_image_slots=2, image_cache_bytes=0) as model:
        image = model.prepare_images([picture(SIZES["4 tiles"])])[0]
        model.engine.encode(0, image)
        assert run_in_steps(model.engine, 1, image, 1)[-1] == 0
        assert bytes(get_slot_state(model._ctx, 1)) == bytes(get_slot_state(model._ctx, 0))


@pytest.mark.skipif(len(GPUS) < 2, reason="needs two GPUs")
def test_two_gpus_split_the_text_layers(converted):
    """The multi-device path (the same as RPC's): 4 text layers, shares 1:1 -> 2 on each GPU, logits as the CPU's."""
    path = converted("f16")
    _, cpu_logits, _, _ = run(path, "cpu", "b_4_tiles")
    names = [GPUS[0]["name"], GPUS[1]["name"]]
    with mllama.Model(path, n_ctx=512, device=names[0], devices=names, tensor_split=[1, 1]) as model:
        runs = [(p.first_layer, p.n_layers, p.device) for p in model.placement if p.component == "text"]
        logits = model.forward(*model.chat_prompt(CASES["b_4_tiles"]))
    assert runs == [(0, 2, names[0]), (2, 2, names[1])]
    assert nmse(logits, cpu_logits) <= 1e-4
