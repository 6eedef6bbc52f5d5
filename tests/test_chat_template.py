"""Chat template: our rendering equals plain jinja2 rendering of the reference template."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2 import Environment

from mllama.text.chat_template import TemplateError, default_template, render

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "llama32-vision-instruct-chat-template.jinja"


def reference_render(messages, **kwargs) -> str:
    source = SPEC.read_text() if SPEC.exists() else default_template()

    def raise_exception(message):
        raise RuntimeError(message)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True, **kwargs)


def ours(messages, **kwargs) -> str:
    return render(default_template(), messages, bos_token="<|begin_of_text|>", **kwargs)


IMG = {"type": "image"}


def txt(t):
    return {"type": "text", "text": t}


CASES = {
    "text_only": [{"role": "user", "content": "Hello there"}],
    "one_image": [{"role": "user", "content": [IMG, txt("Describe this image.")]}],
    "image_second_turn": [
        {"role": "user", "content": [txt("What is in"), IMG, txt("?")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [IMG, txt("And here?")]},
    ],
    "system_no_images": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    messages = CASES[name]
    assert ours(messages, date_string="22 Nov 2026") == reference_render(messages, date_string="22 Nov 2026")


def test_spec_examples():
    assert ours(CASES["one_image"]) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image."
                                        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Today Date: 22 Nov 2026\n\nBe brief.<|eot_id|>" in ours(CASES["system_no_images"], date_string="22 Nov 2026")


def test_images_with_system_prompt_is_an_error():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMG, txt("Hi")]}]
    with pytest.raises(RuntimeError, match="incompatible with system messages"):
        reference_render(messages)
    with pytest.raises(TemplateError, match="incompatible with system messages"):
        ours(messages)


def test_openai_and_ollama_message_shapes():
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(b"png-bytes").decode()
    openai_style = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}, txt("Describe this image.")]}]
    ollama_style = [{"role": "user", "content": "Describe this image.", "images": [b"png-bytes"]}]
    assert ours(openai_style) == ours(ollama_style) == ours(CASES["one_image"])


def test_remote_urls_are_refused():
    with pytest.raises(ValueError, match="remote image URLs"):
        ours([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
