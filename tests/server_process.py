"""Test helper: `python3 -m ondo serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(*flags: str, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """Start `ondo serve` with `flags` and wait until /health answers; (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ondo", "serve", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, timeout_s)
    return proc, base


def wait_healthy(proc: subprocess.Popen, base: str, timeout_s: float) -> None:
    """Until `base`/health answers 200; the test fails (and the server is killed) if it
    exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail("ondo serve exited early:\n" + (proc.stdout.read() if proc.stdout else ""))
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"ondo serve did not answer /health within {timeout_s} s")
