"""Who may do what in the console: tokens with a role, stored hashed in the telemetry file.

Roles, each including the one before: `viewer` (read pages and JSON), `operator` (approve,
reject, revise and propose actions), `admin` (also create and revoke tokens). A token is
`ondo_` and 43 random URL-safe characters (256 bits); only its SHA-256 is stored, so a copy
of the database gives no one a token. Such a token needs no slow hash: it cannot be
guessed from its digest.

Reads take the token from the `Authorization: Bearer` header or, for pages and the live
stream that a browser opens itself, from the `ondo_console_token` cookie. Every change takes
it from the header only: another site can make a browser send a cookie, never a header, so
there is nothing to forge (no CSRF). With no token stored at all, reads are open (the
console then only listens on loopback, see `serve.py`) and changes are refused.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

COOKIE = "ondo_console_token"
TOKEN_PREFIX = "ondo_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

DDL = """
CREATE TABLE IF NOT EXISTS console_tokens (
    token_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_wall_s REAL NOT NULL,
    revoked_wall_s REAL
);
"""


class Role(str, enum.Enum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return ROLES.index(self.value)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


ROLES: tuple[str, ...] = ("viewer", "operator", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token's name and role (`anonymous` viewer where no token exists)."""

    name: str
    role: Role
    token_id: str | None = None


ANONYMOUS = Principal("anonymous", Role.VIEWER)


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    name: str
    role: str
    created_wall_s: float
    revoked_wall_s: float | None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"--name {name!r}: 1 to 64 letters, digits or . _ @ -, starting with "
                         "a letter or digit")
    return name


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValueError(f"--role {role!r}: one of {', '.join(ROLES)}") from None


class TokenStore:
    """The `console_tokens` table of `path` (None: no tokens, reads open, changes refused)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)

    def _connect(self) -> sqlite3.Connection:
        """A connection with the table made (for changes)."""
        assert self.path is not None
        conn = sqlite3.connect(str(self.path), timeout=5.0)
        conn.executescript(DDL)
        return conn

    def _read(self) -> sqlite3.Connection | None:
        """A connection for reads, None where the table was never made: reads write nothing,
        so a server whose disk is full (its telemetry in the same file) still starts and
        answers with no tokens."""
        assert self.path is not None
        conn = sqlite3.connect(str(self.path), timeout=5.0)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'console_tokens'").fetchone():
            return conn
        conn.close()
        return None

    def create(self, role: str, name: str) -> tuple[str, TokenInfo]:
        """A new token (shown once) and what is stored of it."""
        if self.path is None:
            raise ValueError("tokens need a database: --db PATH (the server's --telemetry-db)")
        r, name = check_role(role), check_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(secrets.token_hex(6), name, r.value, time.time(), None)
        conn = self._connect()
        try:
            with conn:
                conn.execute("INSERT INTO console_tokens VALUES (?, ?, ?, ?, ?, NULL)",
                             (info.token_id, info.name, info.role, token_sha256(token),
                              info.created_wall_s))
        finally:
            conn.close()
        return token, info

    def list(self) -> list[TokenInfo]:
        if self.path is None or not self.path.exists() or (conn := self._read()) is None:
            return []
        try:
            rows = conn.execute("SELECT token_id, name, role, created_wall_s, revoked_wall_s "
                                "FROM console_tokens ORDER BY created_wall_s").fetchall()
        finally:
            conn.close()
        return [TokenInfo(*r) for r in rows]

    def revoke(self, token_id: str) -> bool:
        """True if an active token was revoked."""
        if self.path is None or not self.path.exists():
            return False
        conn = self._connect()
        try:
            with conn:
                n = conn.execute("UPDATE console_tokens SET revoked_wall_s = ? WHERE token_id = ? "
                                 "AND revoked_wall_s IS NULL", (time.time(), token_id)).rowcount
        finally:
            conn.close()
        return n > 0

    def active_count(self) -> int:
        if self.path is None or not self.path.exists() or (conn := self._read()) is None:
            return 0
        try:
            (n,) = conn.execute("SELECT COUNT(*) FROM console_tokens "
                                "WHERE revoked_wall_s IS NULL").fetchone()
        finally:
            conn.close()
        return int(n)

    def lookup(self, token: str) -> Principal | None:
        """The principal of an active token, None for an unknown or revoked one."""
        if self.path is None or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        if not self.path.exists() or (conn := self._read()) is None:
            return None
        try:
            row = conn.execute("SELECT token_id, name, role FROM console_tokens WHERE "
                               "token_sha256 = ? AND revoked_wall_s IS NULL",
                               (token_sha256(token),)).fetchone()
        finally:
            conn.close()
        return None if row is None else Principal(row[1], Role(row[2]), row[0])
