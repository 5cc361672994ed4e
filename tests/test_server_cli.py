"""`python -m refinfer serve` as a user runs it: a subprocess on loopback (port 0: a free one),
its announcement, /health going from 503 to 200, an answer equal to generate, a clean stop on
SIGINT; and its option errors (error + hint, exit 2, before anything listens)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import refinfer
from server_refs import reference

STARTUP_S = 120


def test_serve_starts_answers_and_stops(tiny_chat_gguf):
    p = subprocess.Popen([sys.executable, "-m", "refinfer", "serve", "-m", str(tiny_chat_gguf), "--port", "0",
                          "--parallel", "2", "--model-alias", "tiny", "--backend", "numba"],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = p.stderr.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert m, line
        url = m.group(1)
        deadline = time.monotonic() + STARTUP_S
        while (h := httpx.get(url + "/health", timeout=10)).status_code != 200:
            assert h.status_code == 503 and time.monotonic() < deadline, h.text
            time.sleep(0.1)
        assert "ready" in p.stderr.readline()
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hi there", "max_tokens": 5, "seed": 8},
                       timeout=60).json()
        want = reference(refinfer.load(tiny_chat_gguf, backend="numba"), prompt="Hi there", max_tokens=5, seed=8)
        assert r["choices"][0]["text"] == want.text and r["model"] == "tiny"
        assert httpx.get(url + "/docs", timeout=10).status_code == 200
        assert "swagger-ui-bundle.js" in httpx.get(url + "/docs", timeout=10).text
        assert "cdn" not in httpx.get(url + "/docs", timeout=10).text.lower()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) in (0, 130)                   # 130: stopped by SIGINT, as a shell reports it
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--parallel", "0"], "--parallel must be"),
    (["--max-queue", "-1"], "--max-queue must be"),
    (["--ctx", "1"], "--ctx must be"),
    (["--kv-cache-mib", "0"], "--kv-cache-mib must be > 0"),
    (["--api-key", " "], "--api-key is empty"),
    (["--mode", "fast"], "mode"),
    (["--parallel", "x"], "invalid int value"),
])
def test_serve_option_errors(args, words):
    p = subprocess.run([sys.executable, "-m", "refinfer", "serve", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert words in p.stderr and "hint:" in p.stderr and "Traceback" not in p.stderr


def test_serve_on_a_port_in_use_says_so():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "refinfer", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=60)
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr


def test_serve_exits_when_the_model_does_not_load(tmp_path):
    p = subprocess.run([sys.executable, "-m", "refinfer", "serve", "-m", str(tmp_path / "none.gguf"), "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "the model did not load" in p.stderr and "none.gguf" in p.stderr, p.stderr
