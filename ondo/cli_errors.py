"""What the `ondo` commands say about bad input: which exceptions an operator's input
raises (as opposed to a defect), and one line for each that names the --db it came from."""

from __future__ import annotations

import argparse
import sqlite3
import sys


def user_error(e: BaseException) -> bool:
    """Whether `e` is what an operator's input makes a command raise: a file missing or
    unreadable, a value refused, a database that is none (sqlite3's or apsw's)."""
    apsw = sys.modules.get("apsw")
    return isinstance(e, (OSError, ValueError, sqlite3.Error)) or (apsw is not None and isinstance(e, apsw.Error))


def database_error(e: BaseException) -> bool:
    return isinstance(e, sqlite3.Error) or type(e).__module__ == "apsw"


def describe_user_error(e: BaseException, args: argparse.Namespace) -> str:
    """One line for it; a database's own error ("file is not a database") names the --db
    it came from."""
    message = str(e) or type(e).__name__
    db = getattr(args, "db", None)
    if database_error(e) and db is not None and str(db) not in message:
        message = f"--db {db}: {message}"
    return message
