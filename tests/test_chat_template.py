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
    "second_system_message_as_written": [  # only the first system message is the trimmed system prompt
        {"role": "system", "content": " s1 "}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}, {"role": "system", "content": " s2 "},
        {"role": "user", "content": "Again"}],
    "private_use_text": [{"role": "user", "content": "icons \ue000 0:1\ue001 \ue0000\ue001"}],
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


def test_null_content_is_empty_text():
    """OpenAI's clients send "content": null; an empty system prompt, not the text "[]"."""
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    null = [{**m, "content": None} if m["role"] != "user" else m for m in empty]
    assert ours(null, date_string="1 Dec 2026") == ours(empty, date_string="1 Dec 2026") == \
        reference_render(empty, date_string="1 Dec 2026")


def test_text_that_looks_like_a_marker_stays_as_written():
    """User text is rendered through markers: text of a request that is not user text (a tool's description,
    a tool result) that looks like one must come out as written, not as another message's text."""
    from mllama.text.chat_template import normalize, render_segments

    tools = [{"type": "function", "function": {"name": "f", "description": "icon \ue0000\ue001 \ue0007\ue001",
                                               "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "SECRET"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "result \ue0001\ue001"}]
    segments = render_segments(default_template(), normalize(messages), bos_token="<|begin_of_text|>", tools=tools)
    text = "".join(t for t, _ in segments)
    assert text.count("SECRET") == 1 and [t for t, user in segments if user] == ["SECRET"]
    assert "icon \ue0000\ue001 \ue0007\ue001" in text and "result \ue0001\ue001" in text


def test_openai_and_ollama_message_shapes():
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(b"png-bytes").decode()
    openai_style = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}, txt("Describe this image.")]}]
    ollama_style = [{"role": "user", "content": "Describe this image.", "images": [b"png-bytes"]}]
    assert ours(openai_style) == ours(ollama_style) == ours(CASES["one_image"])


def test_remote_urls_are_refused():
    with pytest.raises(ValueError, match="remote image URLs"):
        ours([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])


TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("empty", ["", None, "  "])
def test_an_empty_system_prompt_next_to_an_image_is_none(empty):
    """As the template reads it (its test of an empty system message had seen a marker: refused with images)."""
    messages = [{"role": "system", "content": empty}, {"role": "user", "content": [IMG, txt("Describe.")]}]
    expected = reference_render([{"role": "system", "content": empty or ""}, messages[1]], date_string="1 Dec 2026")
    assert ours(messages, date_string="1 Dec 2026") == expected


def test_with_tools_the_first_user_message_is_trimmed_as_the_template_trims_it():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is the weather?\n"}]
    kwargs = {"tools": TOOLS, "date_string": "1 Dec 2026"}
    ends = [text.rsplit("}\n\n", 1)[1] for text in (ours(messages, **kwargs), reference_render(messages, **kwargs))]
    assert ends[0] == ends[1] and ends[0].startswith("What is the weather?<|eot_id|>")  # (the spaces had stayed)
    # (the tools' JSON before it differs on purpose: the function object, as Meta's prompt format shows a tool)


def test_tool_json_nested_too_deeply_and_images_not_in_a_list():
    """A RecursionError had been a 500 on every route; a string of images had been read letter by letter."""
    deep = "[" * 50000 + "]" * 50000
    user = {"role": "user", "content": "Hi"}
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": deep}}]}
    with pytest.raises(ValueError, match="message 1: tool call arguments are nested too deeply"):
        ours([user, call], tools=TOOLS)
    call["tool_calls"][0]["function"]["arguments"] = "{}"
    assert deep in ours([user, call, {"role": "tool", "content": deep}], tools=TOOLS)  # its text, as written
    with pytest.raises(ValueError, match="message 0: images must be a list of images"):
        ours([{"role": "user", "content": "Hi", "images": "photo.png"}])
