"""Test helper: `python3 -m ondo serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
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


def server_log(proc: subprocess.Popen, wait_s: float = 5.0) -> str:
    """What a killed server wrote, for a failing test's report: read on a thread and given
    up on after `wait_s` (its engine process may still hold the pipe open)."""
    if proc.poll() is None:
        proc.kill()
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(wait_s)
    return chunks[0] if chunks else f"(nothing readable within {wait_s:.0f} s)"
