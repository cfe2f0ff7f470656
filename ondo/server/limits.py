"""Limits that keep one request from stalling the others.

- `BodySizeLimit`: an ASGI middleware that answers 413 to a body larger than
  `--max-request-bytes` before any of it is read or parsed: at once from its
  Content-Length, or, for a chunked body, as soon as the bytes read pass the limit. The
  rest of the body is then read and dropped (never kept), then the connection closes.
- `RequestLimits`: the per-request bounds the serving code checks (deadline, stop lists),
  and how long an idle keep-alive connection stays open.

The keep-alive timeout is longer than the clients' own (aiohttp 15 s, httpx and the openai
client 5 s) and than a load balancer's usual idle timeout (60 s), as nginx's 75 s is: the
side that closes an idle connection must be the client, because a request the client sends
on a connection the server is closing at that moment is lost (reset, or "server
disconnected"), and a client cannot safely retry a POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256
DISCARD_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 75.0

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout_s: float | None = None  # None: no deadline
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # an idle connection closes after this

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes={self.max_request_bytes} must be >= 1")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout={self.request_timeout_s} must be > 0 seconds")
        if not self.keep_alive_s > 0:
            raise ValueError(f"--timeout-keep-alive={self.keep_alive_s} must be > 0 seconds")


def too_large_message(num_bytes: int | None, limit: int) -> str:
    size = f"{num_bytes} bytes" if num_bytes is not None else f"more than {limit} bytes"
    return (f"the request body has {size}, over this server's limit of {limit} bytes "
            f"(--max-request-bytes)")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int]) -> None:
        self.app = app
        self._max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes() if callable(self._max_bytes) else self._max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes
        headers = dict(scope.get("headers") or [])
        length = _content_length(headers.get(b"content-length"))
        if length is not None and length > max_bytes:
            await _reject(send, too_large_message(length, max_bytes), receive,
                          body_pending=headers.get(b"expect", b"").lower() != b"100-continue")
            return
        if length is not None or b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # the HTTP layer holds the body to its length
            return
        # Chunked: read it here, counting, and hand the app what was read.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            size += len(message.get("body", b""))
            if size > max_bytes:
                await _reject(send, too_large_message(None, max_bytes), receive,
                              body_pending=message.get("more_body", False))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _content_length(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # the HTTP layer answers 400 to a malformed Content-Length


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the disconnect, when it comes

    return replay


async def _reject(send: Send, message: str, receive: Receive, body_pending: bool) -> None:
    """The whole 413 goes out at once (a client that reads while it sends has it in
    milliseconds); the response is ended only after the rest of the body was read and
    dropped, because a connection closed under a client still sending resets, and a
    client that reads only after sending (most do) would lose the answer. A client that
    asked `Expect: 100-continue` sends no body: nothing to read."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": "request_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    if body_pending:
        await _discard_body(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _discard_body(receive: Receive, timeout_s: float = DISCARD_TIMEOUT_S) -> None:
    """Read the rest of the body and drop it; a body that does not end within `timeout_s`
    is cut off (the connection closes)."""

    async def drain() -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), timeout_s)
