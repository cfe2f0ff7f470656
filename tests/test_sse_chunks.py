"""A stream's text chunks from a template are the bytes the response models would write."""

from __future__ import annotations

import json

import pytest

from ondo.server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from ondo.server.serving import sse
from ondo.server.sse_chunks import TextChunks

TEXTS = ["", " the", 'say "hi"', "back\\slash", "line\nbreak\ttab\r", "\x00\x01\x1f\x7f",
         "naïve café", "日本語", "🙂 emoji", "\u2028\u2029", "\ufffd", "</script>", "x" * 5000]


def _completion(request_id: str, model: str):
    return lambda index, text: CompletionResponse(
        id=request_id, created=1796500000, model=model,
        choices=[CompletionChoice(index=index, text=text)])


def _chat(request_id: str, model: str):
    return lambda index, text: ChatCompletionChunk(
        id=request_id, created=1796500000, model=model,
        choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=text))])


@pytest.mark.parametrize("make", [_completion, _chat])
@pytest.mark.parametrize("model", ["qwen3-0.6b", 'odd "name"\\ü'])
def test_text_chunks_equal_the_models_dump(make, model):
    chunks = TextChunks(make("cmpl-3f2a", model))
    for index in (0, 7, 0, 12):
        for text in TEXTS:
            expected = sse(make("cmpl-3f2a", model)(index, text))
            assert chunks(index, text) == expected
            assert json.loads(expected[len("data: "):])["choices"][0]["index"] == index


def test_a_model_without_its_text_once_is_refused():
    chunks = TextChunks(lambda index, text: CompletionResponse(
        id=text, model=text, choices=[CompletionChoice(index=index, text=text)]))
    with pytest.raises(ValueError, match="exactly once"):
        chunks(0, "a")
    chunks = TextChunks(lambda index, text: CompletionResponse(id="x", model="m", choices=[]))
    with pytest.raises(ValueError, match="exactly once"):
        chunks(0, "a")
