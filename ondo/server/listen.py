"""The server's listening socket, bound before the engine loads: a port that is taken, or
an address that is not this machine's, fails `ondo serve` at once with one line, not after
the model has loaded (seconds on a CPU, a minute on a GPU)."""

from __future__ import annotations

import argparse
import socket

MAX_PORT = 65535


def port_number(text: str) -> int:
    """argparse's type for --port: a whole number from 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to {MAX_PORT})")
    return port


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) as uvicorn binds one (IPv6 where the host has a
    colon, SO_REUSEADDR), not yet listening; OSError "cannot listen on HOST:PORT: why"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OSError(f"cannot listen on {host}:{port}: {why}") from None
    return sock
