"""`ondo serve` binds its port and checks its database before the engine loads: a taken
port, a bad one or a telemetry database that is none fails at once with one line; --port 0
serves on a free port, named in the log."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from ondo.server.listen import bind_listen_socket, port_number
from tests.server_process import server_log, wait_healthy


def test_port_numbers():
    assert port_number("0") == 0 and port_number("8000") == 8000 and port_number("65535") == 65535
    for bad in ("70000", "-1", "http", "80.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="port number"):
            port_number(bad)


def test_a_taken_port_is_refused_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            bind_listen_socket("127.0.0.1", port)
    sock = bind_listen_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def _serve(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ondo", "serve", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_serve_on_a_taken_port_fails_before_the_engine_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--port", str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in out
    assert "engine ready" not in out and "Traceback" not in out  # refused before loading the model


def test_serve_refuses_a_port_out_of_range():
    proc = _serve("--port", "70000")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "70000 is not a port number (0 to 65535)" in out and "Traceback" not in out


def test_port_0_serves_on_a_free_port_the_log_names():
    proc = _serve("--port", "0")
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+) ", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base, 60)
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            server_log(proc)


def test_the_stored_consoles_taken_port_is_refused_too(tmp_path, capsys):
    import sqlite3

    import ondo.cli

    db = tmp_path / "t.db"
    sqlite3.connect(db).close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert ondo.cli.main(["console", "--db", str(db), "--port", str(port)]) == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["not a database", "a folder", "no such folder", "negative drain"])
def test_flags_that_cannot_work_are_refused_before_the_engine_loads(tmp_path, case):
    garbage = tmp_path / "garbage.db"
    garbage.write_text("no database here\n")
    flags, says = {
        "not a database": (["--telemetry-db", str(garbage)], f"--telemetry-db {garbage}: file is not a database"),
        "a folder": (["--telemetry-db", str(tmp_path)], f"--telemetry-db {tmp_path}: a folder, not a database file"),
        "no such folder": (["--telemetry-db", str(tmp_path / "no" / "t.db")],
                           f"--telemetry-db {tmp_path / 'no' / 't.db'}: unable to open database file"),
        "negative drain": (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0 seconds, got -1.0"),
    }[case]
    proc = _serve("--port", "0", *flags)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"error: {says}" in out
    assert "engine ready" not in out and "Traceback" not in out
    assert garbage.read_text() == "no database here\n"  # nothing written over it
