"""`ondo serve` started by a benchmark: on dummy weights of a shape, its output in a log
file, ready once /health answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx


def start_dummy_server(folder: str, port: int, flags: list[str],
                       log_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """`ondo serve FOLDER --load-format dummy --port PORT FLAGS...` on loopback, its output
    in `log_path` (else this process's); (process, base URL) once it answers /health. A
server that does not get there is killed."""
    cmd = [sys.executable, "-m", "ondo", "serve", folder, "--load-format", "dummy",
           "--port", str(port), *flags]
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 (the server's whole life)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
    except BaseException:  # not ready (or interrupted): leave no server behind
        proc.kill()
        proc.wait()
        raise
    return proc, base


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
