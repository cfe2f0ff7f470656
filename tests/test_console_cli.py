"""`ondo console token create|list|revoke`, and where the console agrees to listen: loopback
without tokens, any other address only once a token exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ondo.cli import build_parser, main
from ondo.console.auth import TokenStore, token_sha256
from ondo.console.serve import console_settings, is_loopback


def _ondo(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ondo", *argv], capture_output=True, text=True,
                          timeout=60)


def test_tokens_are_printed_once_stored_hashed_listed_and_revoked(tmp_path) -> None:
    db = tmp_path / "ondo.db"
    r = _ondo("console", "token", "create", "--role", "operator", "--name", "alice",
              "--db", str(db))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("ondo_") and len(token) > 40
    store = TokenStore(db)
    who = store.lookup(token)
    assert (who.name, who.role.value) == ("alice", "operator")
    assert token not in db.read_bytes().decode("latin-1")  # only its digest is stored
    assert token_sha256(token) in db.read_bytes().decode("latin-1")
    listed = _ondo("console", "token", "list", "--db", str(db)).stdout
    assert "alice" in listed and "operator" in listed and token not in listed
    assert _ondo("console", "token", "create", "--role", "root", "--db", str(db)).returncode == 2
    bad = _ondo("console", "token", "create", "--role", "viewer", "--name", "a b",
                "--db", str(db))
    assert bad.returncode == 2 and "--name" in bad.stderr
    token_id = store.list()[0].token_id
    assert main(["console", "token", "revoke", token_id, "--db", str(db)]) == 0
    assert store.lookup(token) is None and store.active_count() == 0
    assert main(["console", "token", "revoke", token_id, "--db", str(db)]) == 2  # no longer active
    assert main(["console", "--db", str(tmp_path / "none.db")]) == 2


def test_reading_tokens_writes_nothing_so_a_full_disk_does_not_stop_the_server(tmp_path) -> None:
    """A database of telemetry with no token table yet (the server's file before any token
    was made): counting, listing and looking up tokens leave it byte for byte as it was
    (making the table there on a full disk failed the server's start), and a path that does
    not exist is not created. A file the limit of which is reached still answers reads."""
    import sqlite3

    db = tmp_path / "serve.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE samples (t REAL, watts REAL)")
        conn.executemany("INSERT INTO samples VALUES (?, ?)", [(i * 0.01, 300.0) for i in range(2000)])
    conn.close()
    before = db.read_bytes()
    store = TokenStore(db)
    assert store.active_count() == 0 and store.list() == [] and store.lookup("ondo_" + "x" * 43) is None
    assert db.read_bytes() == before
    missing = TokenStore(tmp_path / "missing.db")
    assert missing.lookup("ondo_" + "x" * 43) is None and missing.active_count() == 0
    assert not (tmp_path / "missing.db").exists()
    # In a process that may not grow any file past the database's size, as the full-disk
    # server test runs: reads answer, the first token cannot be made.
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before)}, {len(before)})); "
            "from ondo.console.auth import TokenStore; s = TokenStore(sys.argv[1]); "
            "print(s.active_count(), len(s.list())); s.create('admin', 'root')")
    r = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["0", "0"] and r.returncode != 0 and "OperationalError" in r.stderr


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_the_console_listens_beyond_loopback_only_with_tokens(tmp_path) -> None:
    db = tmp_path / "ondo.db"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert console_settings(_serve_args("--telemetry-db", str(db))).db == str(db)
    with pytest.raises(ValueError, match="--host 0.0.0.0: the console refuses"):
        console_settings(_serve_args("--host", "0.0.0.0", "--telemetry-db", str(db)))
    with pytest.raises(ValueError, match="no --telemetry-db"):
        console_settings(_serve_args("--host", "0.0.0.0"))
    assert console_settings(_serve_args("--host", "0.0.0.0", "--console", "off")) is None
    TokenStore(db).create("admin", "root")
    assert console_settings(_serve_args("--host", "0.0.0.0", "--telemetry-db", str(db)))
    with pytest.raises(ValueError, match="--console-outcome-s"):
        console_settings(_serve_args("--console-outcome-s", "0"))
    r = _ondo("serve", "--host", "0.0.0.0", "--telemetry-db", str(tmp_path / "other.db"))
    assert r.returncode == 2 and "the console refuses" in r.stderr
