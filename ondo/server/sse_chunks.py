"""A stream's mid-stream text chunks as server-sent events, without a pydantic model per
token.

Every token of every streamed request is one event; building and dumping a response model
for each was about a tenth of the server's event loop (8 % of its CPU per streamed token,
`bench/server_stream_cost.py --model-shape tiny-llama`).
A stream's events differ only in their text (and choice index), so `TextChunks` dumps the
chunk model once per stream with a placeholder text, cuts the JSON around it, and fills in
each text encoded by pydantic's own JSON encoder: the bytes are those `model_dump_json`
writes (tests/test_sse_chunks.py checks them against it). Chunks with a finish reason,
log-probabilities or tool calls still go through the models.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel
from pydantic_core import to_json

_PLACEHOLDER = "\x00ondo-text\x00"
_MARKER = to_json(_PLACEHOLDER).decode()  # the placeholder as it appears in the JSON


class TextChunks:
    """`sse(make(index, text))` for any index and text, from one dump per index."""

    def __init__(self, make: Callable[[int, str], BaseModel]) -> None:
        self._make = make
        self._parts: dict[int, tuple[str, str]] = {}

    def _cut(self, index: int) -> tuple[str, str]:
        body = self._make(index, _PLACEHOLDER).model_dump_json()
        if body.count(_MARKER) != 1:
            raise ValueError("the chunk model must carry its text exactly once")
        head, tail = body.split(_MARKER)
        return f"data: {head}", f"{tail}\n\n"

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            parts = self._parts[index] = self._cut(index)
        return parts[0] + to_json(text).decode() + parts[1]
