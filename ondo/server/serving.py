"""What chat and completions share: model and length checks, sampling parameters,
running a request until it finishes or its client leaves, and SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from ondo.engine.async_llm import AsyncLLM
from ondo.engine.outputs import RequestOutput
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.structured_outputs import StructuredOutputsParams
from ondo.server.errors import APIError, bad_request, from_engine_exception, from_sampling_error
from ondo.server.metrics import ServerMetrics
from ondo.server.protocol import UsageInfo

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


@dataclass
class ServingContext:
    async_llm: AsyncLLM
    model_name: str
    metrics: ServerMetrics

    @property
    def max_model_len(self) -> int:
        return self.async_llm.max_model_len

    @property
    def tokenizer(self):
        if self.async_llm.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids")
        return self.async_llm.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.async_llm.vocab_size
        if not ids:
            raise bad_request("the prompt is empty", param)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: ids must be in [0, {vocab})", param)

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (ValueError, TypeError, UnicodeError) as e:  # e.g. lone surrogates in the text
            raise bad_request(f"cannot tokenize {param}: {e}", param) from e

    def decode_token(self, token_id: int) -> str:
        if self.async_llm.tokenizer is None:
            return f"token_id:{token_id}"
        return self.async_llm.tokenizer.decode([token_id], skip_special_tokens=False)

    def resolve_max_tokens(self, prompt_len: int, requested: Any, param: str,
                           prompt_param: str) -> int | None:
        """The request's max_tokens, checked against the context length; None asked → all room left."""
        room = self.max_model_len - prompt_len
        if requested is None:
            if room < 1:
                raise bad_request(
                    f"the prompt has {prompt_len} tokens, which leaves no room to generate within "
                    f"this model's maximum context length of {self.max_model_len} tokens",
                    prompt_param)
            return room
        if isinstance(requested, int) and requested >= 1 and prompt_len + requested > self.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {prompt_len} tokens and {param} is {requested} "
                f"({prompt_len + requested} in all)", param)
        return requested

    def sampling_params(self, request: Any, max_tokens: int | None, logprobs: int | None,
                        rename: dict[str, str],
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        n, best_of = given(request.n, 1), getattr(request, "best_of", None)
        if best_of is not None and best_of != n and request.stream:
            raise bad_request(f"best_of={best_of} with n={n} cannot be streamed: the best "
                              "sequences are known only when all have finished", "best_of")
        try:
            return SamplingParams(
                n=n,
                best_of=best_of,
                logit_bias=self.logit_bias(getattr(request, "logit_bias", None)),
                structured_outputs=structured,
                temperature=given(request.temperature, 1.0),
                top_p=given(request.top_p, 1.0),
                top_k=given(request.top_k, 0),
                min_p=given(request.min_p, 0.0),
                seed=request.seed,
                repetition_penalty=given(request.repetition_penalty, 1.0),
                presence_penalty=given(request.presence_penalty, 0.0),
                frequency_penalty=given(request.frequency_penalty, 0.0),
                max_tokens=max_tokens,
                min_tokens=given(request.min_tokens, 0),
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=bool(request.ignore_eos),
                logprobs=logprobs,
                skip_special_tokens=given(request.skip_special_tokens, True),
                include_stop_str_in_output=bool(request.include_stop_str_in_output),
            )
        except ValueError as e:
            raise from_sampling_error(e, rename) from e

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's logit_bias (token ids as JSON keys) with ids checked against the vocabulary."""
        if not bias:
            return None
        vocab = self.async_llm.vocab_size
        out: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
            if not 0 <= token < vocab:
                raise bad_request(f"logit_bias names token id {token}, out of range: ids must be "
                                  f"in [0, {vocab})", "logit_bias")
            out[token] = value
        return out

    def generate(self, request_id: str, prompt_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        return self.metrics.observe(self.async_llm.generate(request_id, prompt_ids, params))


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index. Leaving
    early closes every stream (so each aborts its request)."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
            queue.put_nowait((index, done))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client goes away first; then cancel it (which aborts
    its engine requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


async def first_item(stream: AsyncIterator[T]) -> T | None:
    """The first item, raising engine-side failures (full queue, bad input) as APIErrors
    before any response header has gone out."""
    try:
        return await anext(stream)  # noqa: F821 (builtin since 3.10)
    except StopAsyncIteration:
        return None
    except Exception as e:
        await stream.aclose()  # type: ignore[attr-defined]
        raise as_api_error(e) from e


def as_api_error(e: Exception) -> APIError:
    return e if isinstance(e, APIError) else from_engine_exception(e)


# OpenAI's stand-in for a log-probability too small to write down (JSON has no -inf).
MIN_LOGPROB = -9999.0


def clamp_logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


def top_n(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def sse(data: BaseModel | dict[str, Any]) -> str:
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: Exception) -> str:
    return sse(as_api_error(e).body())


def check_finished_ok(out: RequestOutput) -> None:
    if out.error is not None:
        raise APIError(500, f"the request failed in the engine: {out.error}", code="engine_error")
