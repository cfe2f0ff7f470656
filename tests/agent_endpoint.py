"""Test helper: an OpenAI-compatible endpoint on loopback whose answers a test scripts (a
chat completion made by a function of the request, a delay, an HTTP error), recording every
request it receives."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[dict[str, Any]], str]  # request body -> the message content


class ScriptedEndpoint:
    def __init__(self, answer: Answer, delay_s: float = 0.0, status: int = 200,
                 raw_body: str | None = None) -> None:
        self.answer, self.delay_s, self.status, self.raw_body = answer, delay_s, status, raw_body
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, json.dumps({"data": [{"id": "scripted"}]}))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                time.sleep(owner.delay_s)
                if owner.raw_body is not None:
                    return self._send(owner.status, owner.raw_body)
                if owner.status != 200:
                    return self._send(owner.status, json.dumps({"error": {"message": "boom"}}))
                content = owner.answer(body)
                self._send(200, json.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}}))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
