"""ondo's own server with its embedded model, started for `ondo agent eval` (and the
latency benchmark) when no endpoint is named: `python -m ondo serve` on a free loopback
port, no telemetry, no events, no agent, stopped afterwards."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedServer:
    proc: subprocess.Popen
    base_url: str
    output: IO[str]  # the server's log (a file: a full pipe would stall it)

    def log_text(self) -> str:
        self.output.seek(0)
        return self.output.read()

    @classmethod
    def start(cls, *flags: str, timeout_s: float = 300.0) -> EmbeddedServer:
        """Start it and wait until /v1/models answers; RuntimeError with its output if it
        exits or does not answer in time."""
        port = free_port()
        output = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ondo", "serve", "--port", str(port), "--telemetry", "off",
             "--events", "off", "--agent", "off", *flags],
            stdout=output, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                output.seek(0)
                raise RuntimeError("ondo serve exited early:\n" + output.read()[-4000:])
            try:
                with urllib.request.urlopen(base + "/models", timeout=1) as r:
                    if json.load(r).get("data"):
                        return cls(proc, base, output)
            except OSError:
                pass
            time.sleep(0.5)
        proc.kill()
        raise RuntimeError(f"ondo serve did not answer within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output.close()
