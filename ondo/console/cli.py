"""`ondo console --db PATH` (review a stored database, read-only) and
`ondo console token create|list|revoke --db PATH`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import sys
from pathlib import Path

from ondo.console.auth import ROLES, TokenStore
from ondo.server.listen import port_number


def _serve(args: argparse.Namespace) -> int:
    from ondo.console.serve import is_loopback

    db = Path(args.db)
    problem = _database_problem(db)
    if problem is not None:
        print(f"error: --db {db}: {problem}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and TokenStore(db).active_count() == 0:
        print(f"error: --host {args.host}: the console refuses to listen beyond loopback "
              f"without tokens, and {db} holds none; create one with `ondo console token "
              "create --role viewer --db DB`", file=sys.stderr)
        return 2
    import uvicorn

    from ondo.console.app import build_offline_app
    from ondo.console.service import ConsoleService
    from ondo.server.listen import bind_listen_socket

    try:
        sock = bind_listen_socket(args.host, args.port)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with sock:
        service = ConsoleService(db=db)
        app = build_offline_app(service)
        port = sock.getsockname()[1]
        print(f"reviewing {db} on http://{args.host}:{port}/console/", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning")).run(sockets=[sock])
    return 0


def _database_problem(db: Path) -> str | None:
    """Why `db` is no SQLite database to read (None: it is one), found before a server
    binds its port or a token command acts on it."""
    if not db.exists():
        return "no such database"
    if db.is_dir():
        return "is a folder, not a database"
    try:
        conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return str(e)
    return None


def _token(args: argparse.Namespace) -> int:
    # create may start the database (tokens made before the first `ondo serve`); list and
    # revoke need one that exists.
    problem = None if args.token_command == "create" and not Path(args.db).exists() \
        else _database_problem(Path(args.db))
    if problem is not None:
        print(f"error: --db {args.db}: {problem}", file=sys.stderr)
        return 2
    store = TokenStore(args.db)
    if args.token_command == "create":
        if not Path(args.db).parent.is_dir():
            print(f"error: --db {args.db}: the folder does not exist", file=sys.stderr)
            return 2
        try:
            token, info = store.create(args.role, args.role if args.name is None else args.name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps({"token": token, "token_id": info.token_id, "name": info.name,
                              "role": info.role}))
        else:
            print(token)
            print(f"({info.role} token {info.token_id} for {info.name}; shown once, stored "
                  f"hashed in {args.db})", file=sys.stderr)
        return 0
    if args.token_command == "list":
        for t in store.list():
            when = dt.datetime.fromtimestamp(t.created_wall_s).isoformat(timespec="seconds")
            state = "revoked" if t.revoked_wall_s else "active"
            print(f"{t.token_id}  {t.role:<8}  {t.name:<20}  {when}  {state}")
        return 0
    if not store.revoke(args.token_id):
        print(f"error: no active token {args.token_id!r} in {args.db}", file=sys.stderr)
        return 2
    print(f"revoked {args.token_id}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "console_command", None) == "token":
        if not getattr(args, "token_command", None):
            print("error: ondo console token create|list|revoke", file=sys.stderr)
            return 2
        return _token(args)
    if args.db is None:
        print("error: --db PATH is needed (the database to review)", file=sys.stderr)
        return 2
    return _serve(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="the operator console over a stored database; tokens")
    p.add_argument("--db", default=None, help="the telemetry database (ondo serve --telemetry-db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8001, help="0: any free port")
    p.set_defaults(func=_run)
    csub = p.add_subparsers(dest="console_command", metavar="token")
    t = csub.add_parser("token", help="create, list or revoke console tokens")
    tsub = t.add_subparsers(dest="token_command", metavar="create|list|revoke")
    c = tsub.add_parser("create", help="a new token (printed once)")
    c.add_argument("--role", required=True, choices=ROLES)
    c.add_argument("--name", default=None, help="who holds it (default: the role)")
    c.add_argument("--db", required=True)
    c.add_argument("--json", action="store_true")
    ls = tsub.add_parser("list", help="tokens (never their values)")
    ls.add_argument("--db", required=True)
    rv = tsub.add_parser("revoke", help="revoke a token by its id")
    rv.add_argument("token_id")
    rv.add_argument("--db", required=True)
    for q in (t, c, ls, rv):
        q.set_defaults(func=_run, console_command="token")
