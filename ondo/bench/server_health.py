"""Waiting for a started `ondo serve` to answer /health (the benchmarks that start one)."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 900.0) -> None:
    """Return once `base`/health answers 200; raise if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ondo serve exited with status {proc.returncode} while starting")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ondo serve did not answer /health within {timeout_s:.0f} s")
