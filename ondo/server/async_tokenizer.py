"""Tokenization and chat templating off the event loop, so that a large prompt never
holds up other requests' streams.

One worker thread does the work, in batches like vLLM's async micro-batching
tokenizer: encode calls that arrive while the worker is busy wait together and go
as one batch call, which the Rust tokenizer runs without the interpreter lock (a
multi-megabyte prompt takes the event loop's thread for milliseconds, not the
seconds its encoding takes). Chat templates render in the same thread, one at a time
(jinja is Python: it shares the interpreter lock but not the event loop's turn).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ondo.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH_SIZE = 32


@dataclass
class _Encode:
    text: str
    add_special_tokens: bool
    future: asyncio.Future


class AsyncTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_batch_size: int = MAX_BATCH_SIZE) -> None:
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ondo-tokenize")
        self._pending: list[_Encode] = []
        self._busy = False
        self.num_batches = 0
        self.num_encoded = 0

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as `Tokenizer.encode` gives them; raises what it raises."""
        loop = asyncio.get_running_loop()
        item = _Encode(text, add_special_tokens, loop.create_future())
        self._pending.append(item)
        if not self._busy:
            self._next_batch(loop)
        return await item.future

    async def apply_chat_template(self, messages: list[dict[str, Any]],
                                  add_generation_prompt: bool = True,
                                  tools: list[dict[str, Any]] | None = None,
                                  continue_final_message: bool = False) -> list[int]:
        return await self.run(lambda: self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            tools=tools, continue_final_message=continue_final_message))  # type: ignore[return-value]

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self.run(lambda: self.tokenizer.decode(ids, skip_special_tokens))

    async def run(self, fn: Callable[[], T]) -> T:
        """Any other tokenizer work, on the same thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- batching (on the event loop) -------------------------------------------------
    def _next_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send the waiting encodes that share the first one's settings as one batch."""
        self._pending = [p for p in self._pending if not p.future.done()]  # cancelled callers
        if not self._pending:
            self._busy = False
            return
        add_special = self._pending[0].add_special_tokens
        batch = [p for p in self._pending if p.add_special_tokens == add_special][: self.max_batch_size]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        self._busy = True
        work = loop.run_in_executor(self._executor, _encode_batch, self.tokenizer,
                                    [p.text for p in batch], add_special)
        work.add_done_callback(lambda done: self._batch_done(loop, batch, done))

    def _batch_done(self, loop: asyncio.AbstractEventLoop, batch: list[_Encode],
                    done: asyncio.Future) -> None:
        self.num_batches += 1
        self.num_encoded += len(batch)
        if done.cancelled():
            results: list[Any] = [asyncio.CancelledError()] * len(batch)
        elif done.exception() is not None:
            results = [done.exception()] * len(batch)
        else:
            results = done.result()
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._next_batch(loop)


def _encode_batch(tokenizer: Tokenizer, texts: list[str],
                  add_special_tokens: bool) -> list[list[int] | Exception]:
    """Each text's ids, or the error that text alone raises (one bad text, e.g. with a lone
    surrogate, fails the batch call: the texts are then encoded one by one)."""
    try:
        return tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    except Exception:
        if len(texts) == 1:
            return [_encode_one(tokenizer, texts[0], add_special_tokens)]
    return [_encode_one(tokenizer, t, add_special_tokens) for t in texts]


def _encode_one(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int] | Exception:
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as e:
        return e
