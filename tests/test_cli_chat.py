"""The interactive chat driven through a pseudo-terminal, describe, demo and bench from the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pexpect
import pytest
from PIL import Image


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)).save(path)
    return path


def spawn_chat(gguf, *extra, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    import os

    env = {**os.environ, **env}
    # Ctrl-C reaches the child whatever this suite was started from (a background job ignores SIGINT,
    # and a child inherits that: Python then installs no KeyboardInterrupt handler)
    return pexpect.spawn(sys.executable, ["-m", "mllama", "chat", "-m", str(gguf), "--temperature", "0", *extra],
                         env=env, encoding="utf-8", timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_repl_two_turns_image_save_interrupt_and_eof(gguf_f32, picture, tmp_path):
    child = spawn_chat(gguf_f32, "--max-tokens", "12", tmp_path=tmp_path)
    child.expect("/help for commands")
    child.expect("> ")
    child.sendline(f"/image {picture}")
    child.expect("attached")
    child.expect("> ")
    child.sendline("Describe this image.")
    child.expect("> ")
    child.sendline("What else do you see?")
    child.expect("> ")
    save = tmp_path / "conv.json"
    child.sendline(f"/save {save}")
    child.expect("saved 4 messages")
    child.expect("> ")
    conversation = json.loads(save.read_text())
    save.write_text("the user's own file")
    child.sendline(f"/save {save}")  # never over an existing file
    child.expect("exists: /save! ")
    child.expect("> ")
    child.sendline(f"/save {tmp_path}")  # a folder: reported, and the chat goes on
    child.expect("cannot save to ")
    child.expect("> ")
    assert save.read_text() == "the user's own file"
    child.sendline(f"/save! {save}")
    child.expect("saved 4 messages")
    child.expect("> ")
    assert json.loads(save.read_text()) == conversation
    child.sendline("//usr is a folder")  # "//" sends a message that starts with a slash
    child.expect("> ")
    assert "unknown command" not in child.before
    child.sendline(f"/save! {save}")
    child.expect("saved 6 messages")
    child.expect("> ")
    assert json.loads(save.read_text())[4]["content"][-1]["text"] == "/usr is a folder"
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[0]["content"][0]["type"] == "image"
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_returns_to_the_prompt(gguf_f32, tmp_path):
    child = spawn_chat(gguf_f32, "--max-tokens", "100000", "--ctx", "4096", tmp_path=tmp_path)
    child.expect("> ")
    child.sendline("Write a very long story.")
    child.expect(r"\S{3}")  # some reply text
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_long_repl_chat_leaves_out_its_oldest_messages(gguf_f32, tmp_path):
    child = spawn_chat(gguf_f32, "--max-tokens", "4", "--ctx", "128", tmp_path=tmp_path)
    child.expect("> ")
    notes = 0
    for t in range(12):
        child.sendline(f"Tell me about the number {t}, and then about the one after it.")
        index = child.expect([r"the oldest (\d+) messages were left out", "> "])
        if index == 0:
            notes += 1
            child.expect("> ")
        assert "\nerror: " not in "\n" + child.before.replace("\r", "")  # the REPL's error line
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and notes >= 2


def test_chat_from_a_pipe(gguf_f32):
    proc = subprocess.run([sys.executable, "-m", "mllama", "chat", "-m", str(gguf_f32), "--temperature", "0", "--max-tokens", "8"],
                          input="Hello there", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_describe_json(gguf_f32, picture):
    proc = subprocess.run([sys.executable, "-m", "mllama", "describe", str(picture), str(picture), "-m", str(gguf_f32),
                           "--json", "--temperature", "0", "--max-tokens", "6"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["description"] == lines[1]["description"]
    assert lines[0]["usage"]["completion_tokens"] <= 6


@pytest.mark.parametrize("args,fragment", [
    (["describe", "missing.png", "-m", "MODEL"], "no such image file"),
    (["chat", "-m", "/nonexistent.gguf"], "cannot open"),
    (["chat"], "no model given"),
    (["chat", "-m", "MODEL", "--grammar", "missing.lark"], "--grammar missing.lark: No such file"),
    (["chat", "-m", "MODEL", "--grammar", "bad.lark"], "invalid Lark grammar"),  # llguidance's caret lines joined
    (["chat", "-m", "MODEL"], "no prompt on stdin"),
    (["bench", "-m", "MODEL", "--ctx", "17", "--decode", "4"], "leaves no room to decode"),
    (["chat", "-m", "MODEL", "--ctx", "-5"], "--ctx must be a whole number"),  # (had named n_ctx)
    (["info", "MODEL", "-m", "other.gguf"], "two models given"),  # (MODEL had been ignored)
    (["describe", ".", "-m", "MODEL"], "image . is a directory"),
])
def test_cli_errors_are_one_line(gguf_f32, tmp_path, args, fragment, monkeypatch):
    import os

    args = [str(gguf_f32) if a == "MODEL" else a for a in args]
    env = {k: v for k, v in os.environ.items() if k != "MLLAMA_MODEL"}
    (tmp_path / "bad.lark").write_text("start: bad[\n")
    proc = subprocess.run([sys.executable, "-m", "mllama", *args], capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr


def test_bench_json(gguf_f32):
    proc = subprocess.run([sys.executable, "-m", "mllama", "bench", "-m", str(gguf_f32), "--decode", "4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["decode_tokens"] == 4 and data["prompt_tok_s"] > 0 and data["peak_rss_bytes"] > 0


def test_bench_time_to_first_token_encodes_its_image(gguf_f32):
    """The warm-up's image is in the image cache: the time to first token must not find it there."""
    import mllama
    from mllama.cli.bench import measure

    with mllama.Model(gguf_f32, n_ctx=256) as model:
        assert model.image_cache is not None
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
        measure(model, image, "Describe it.", 2)
        assert model.engine.n_encoded == 2  # the warm-up's, the first token's


def test_demo_builds_once_and_runs(tmp_path):
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-m", "mllama", "demo"], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    assert "building the demo model" in first.stderr and "weights are random" in first.stderr and "demo OK" in first.stderr
    assert list((tmp_path / "cache" / "mllama").glob("demo-random-v*.gguf"))
    second = subprocess.run([sys.executable, "-m", "mllama", "demo", "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0 and "building" not in second.stderr
    assert second.stdout.strip() == first.stdout.strip()  # deterministic: same weights, greedy decoding
    cached, = (tmp_path / "cache" / "mllama").glob("demo-random-v*.gguf")
    with open(cached, "r+b") as f:  # cut short (a build killed, a disk error): it had failed every time after
        f.truncate(cached.stat().st_size // 2)
    third = subprocess.run([sys.executable, "-m", "mllama", "demo"], capture_output=True, text=True, timeout=600,
                           env=env)
    assert third.returncode == 0 and "building it again" in third.stderr, third.stderr
    assert third.stdout.strip() == first.stdout.strip()


def test_image_paths_as_terminals_drop_them(tmp_path, monkeypatch):
    """/image with a path quoted or backslash-escaped (a terminal's drag and drop) attaches the file."""
    from mllama.cli.chat import _unquoted

    (tmp_path / "my photo.png").write_bytes(b"x")
    (tmp_path / "'odd'.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for typed in ("'my photo.png'", '"my photo.png"', "my\\ photo.png", "my photo.png"):
        assert _unquoted(typed) == "my photo.png", typed
    assert _unquoted("'odd'.png") == "'odd'.png"  # a file as typed: kept
    assert _unquoted("'unbalanced.png") == "'unbalanced.png"


def test_describe_with_a_json_schema_and_chat_with_a_grammar(gguf_f32, picture, tmp_path):
    import jsonschema

    legs = {"type": "integer", "minimum": 0, "maximum": 8}
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}, "legs": legs},
              "required": ["animal", "legs"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "answer.lark").write_text('start: "yes" | "no"\n')
    mllama = [sys.executable, "-m", "mllama"]
    proc = subprocess.run([*mllama, "describe", str(picture), str(picture), "-m", str(gguf_f32), "--json",
                           "--json-schema", str(tmp_path / "schema.json"), "--temperature", "1", "--max-tokens", "40"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.strip().splitlines():
        assert json.loads(line)["finish_reason"] == "stop"
        jsonschema.validate(json.loads(json.loads(line)["description"]), schema)
    proc = subprocess.run([*mllama, "chat", "-m", str(gguf_f32), "--grammar", str(tmp_path / "answer.lark"),
                           "--temperature", "1"], input="Is it raining?", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() in ("yes", "no"), proc.stderr


def test_describe_goes_on_past_an_unreadable_image(gguf_f32, picture, tmp_path):
    """Each image's failure is its own (a JSON record with "error"; exit status 1 at the end): it had stopped at the
    first one, the images after it never described."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(picture.read_bytes()[:100])
    proc = subprocess.run([sys.executable, "-m", "mllama", "describe", str(broken), str(picture), "-m", str(gguf_f32),
                           "--json", "--temperature", "0", "--max-tokens", "4"], capture_output=True, text=True,
                          timeout=120)
    records = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    assert proc.returncode == 1 and [r["image"] for r in records] == [str(broken), str(picture)], proc.stderr
    assert "cannot read image" in records[0]["error"] and records[1]["usage"]["completion_tokens"] >= 1


def test_chat_with_its_standard_streams_closed(gguf_f32):
    """A closed stdin reads as empty, a closed stdout as a pipe nobody reads: no AttributeError traceback."""
    mllama = f"{sys.executable} -m mllama"
    closed_in = subprocess.run(f"{mllama} chat -m {gguf_f32} <&-", shell=True, capture_output=True, text=True,
                               timeout=120)
    assert closed_in.returncode == 1 and "no prompt on stdin" in closed_in.stderr, closed_in.stderr
    closed_out = subprocess.run(f"echo Hi | {mllama} chat -m {gguf_f32} --max-tokens 2 >&-", shell=True,
                                capture_output=True, text=True, timeout=120)
    assert closed_out.returncode == 0 and "Traceback" not in closed_out.stderr, closed_out.stderr


@pytest.mark.parametrize("flags,content,fragment", [
    (["describe", "PIC", "--json-schema"], '{"$ref": "#"}', "it admits no text"),  # (at the first token: a page)
    (["describe", "PIC", "--json-schema"], "{not json", "not JSON"),
    (["describe", "PIC", "--json-schema"], '{"type": "strin"}', "invalid JSON schema: Invalid type: strin"),
    (["chat", "--grammar"], "start: foo", 'unknown name: "foo"'),
])
def test_bad_schema_or_grammar_files_are_clear_errors(gguf_f32, picture, tmp_path, flags, content, fragment):
    """llguidance's message, which for a grammar goes on with the line and a caret under the error."""
    (tmp_path / "constraint").write_text(content)
    args = [str(picture) if a == "PIC" else a for a in flags] + [str(tmp_path / "constraint"), "-m", str(gguf_f32)]
    proc = subprocess.run([sys.executable, "-m", "mllama", *args], input="Hi", capture_output=True, text=True,
                          timeout=120)
    first = proc.stderr.splitlines()[0]
    assert proc.returncode == 1 and first.startswith("mllama: error:") and fragment in first, proc.stderr
    assert "Traceback" not in proc.stderr
