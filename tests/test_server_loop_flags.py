"""`ondo serve --loop/--http`: uvicorn's event loop and HTTP parser by name, refused before
the engine loads when the named one is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_process import launch_server


@pytest.mark.parametrize(("flag", "name"), [("--loop", "uvloop"), ("--http", "httptools")])
def test_a_missing_loop_or_parser_is_refused_before_the_engine_loads(flag, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ondo", "serve", "--device", "cpu", flag, name,
                          "--port", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{flag} {name}: {name} is not installed" in out.stderr
    assert "engine ready" not in out.stderr + out.stdout
    assert time.monotonic() - t0 < 60


def test_an_unknown_loop_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "ondo", "serve", "--loop", "trio"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "invalid choice: 'trio'" in out.stderr


def test_named_asyncio_and_h11_serve_a_stream():
    proc, base = launch_server("--device", "cpu", "--max-model-len", "256", "--loop", "asyncio",
                               "--http", "h11")
    try:
        body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
