"""The command line: info and convert, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllama", *args], capture_output=True, text=True, timeout=300, env=env)


def test_info_prints_hparams_tensors_and_devices(gguf_f32):
    proc = run("info", str(gguf_f32))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "112 tensors" in out and "f32 x112" in out
    assert "vocab 128256 logits / 128264 embedding rows / 128257 tokens" in out
    assert "cross-attention at [1, 3]" in out
    assert "devices:" in out and "CPU (cpu)" in out


def test_info_json(gguf_f32):
    proc = run("info", str(gguf_f32), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["n_tensors"] == 112 and data["hparams"]["n_vocab_embd"] == 128264
    assert data["file_size"] == gguf_f32.stat().st_size
    assert any(d["type"] == "cpu" for d in data["devices"])


def test_info_reads_model_from_env(gguf_f32):
    import os

    proc = run("info", "--json", env={**os.environ, "MLLAMA_MODEL": str(gguf_f32)})
    assert proc.returncode == 0 and json.loads(proc.stdout)["n_tensors"] == 112


def test_convert_cli(hf_dir, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run("convert", str(hf_dir), "-o", str(out), "--type", "q8_0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and proc.stdout == ""
    again = run("convert", str(hf_dir), "-o", str(out), "--quiet")
    assert again.returncode == 1
    assert again.stderr.strip().startswith("mllama: error:") and "exists" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_errors_are_one_line(tmp_path):
    for args in (["info", str(tmp_path / "missing.gguf")], ["convert", str(tmp_path), "-o", str(tmp_path / "x.gguf")]):
        proc = run(*args)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mllama: error:"), proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = run("--debug", "info", str(tmp_path / "missing.gguf"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_bad_flag_exits_nonzero():
    proc = run("convert", "--type", "q9_9", "x", "-o", "y")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_info_json_without_a_model():
    import os

    proc = run("info", "--json", env={k: v for k, v in os.environ.items() if k != "MLLAMA_MODEL"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert any(d["type"] == "cpu" for d in data["devices"]) and "machine" in data["cpu"]


def test_bad_numbers_are_one_line_errors(gguf_f32):
    port = run("serve", "-m", str(gguf_f32), "--port", "99999")
    assert port.returncode == 2 and "a port is 0..65535" in port.stderr and "Traceback" not in port.stderr
    parallel = run("serve", str(gguf_f32), "--parallel", "0")  # the model as vLLM's serve takes it: positional
    assert parallel.returncode == 1 and "--parallel must be at least 1" in parallel.stderr, parallel.stderr
    two = run("serve", str(gguf_f32), "-m", "other.gguf")
    assert two.returncode == 1 and "two models given" in two.stderr, two.stderr
    for flag, value, least in (("--max-queue", "-3", 0), ("--max-body", "0", 1)):
        refused = run("serve", str(gguf_f32), flag, value)
        assert refused.returncode == 1 and f"{flag} must be at least {least}" in refused.stderr, refused.stderr
    many = run("serve", str(gguf_f32), "--parallel", "100000", "--port", "0")
    assert many.returncode == 1 and "--parallel must be in [1," in many.stderr, many.stderr
    tokens = run("describe", "--max-tokens", "0", "-m", str(gguf_f32), "missing.png")
    lines = tokens.stderr.strip().splitlines()
    assert tokens.returncode == 1 and len(lines) == 1 and "max_tokens must be at least 1" in lines[0], tokens.stderr


def test_a_closed_pipe_is_not_an_error(gguf_f32):
    proc = subprocess.run(f"{sys.executable} -m mllama info {gguf_f32} | head -1", shell=True, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.count("\n") == 1 and "Broken pipe" not in proc.stderr and "Error" not in proc.stderr


def test_serve_on_port_0_says_the_port_it_listens_on(gguf_f32):
    """Port 0 picks a free port: the banner names it (it had said port 0), and the server answers there."""
    import re
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mllama", "serve", str(gguf_f32), "--port", "0", "--ctx", "256"],
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+) ", banner).group(1))
        assert port != 0, banner
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("no answer on the port the banner named")
    finally:
        proc.kill()
        proc.wait(30)


def test_convert_into_a_folder_that_is_a_file(hf_dir, tmp_path):
    (tmp_path / "red.png").write_bytes(b"x")
    proc = run("convert", str(hf_dir), "-o", str(tmp_path / "red.png" / "x.gguf"))
    assert proc.returncode == 1 and "red.png is a file, not a folder" in proc.stderr, proc.stderr  # (raw errno text)


def test_a_bracketed_ipv6_host_is_taken_as_its_address():
    from argparse import Namespace

    from mllama.cli.serve import address

    assert address(Namespace(host="[::1]", port=None, ollama=False)) == ("::1", 8080)  # (had been refused)
    assert address(Namespace(host="::1", port=0, ollama=True)) == ("::1", 0)
