"""The model behind the agent, reached through the OpenAI API: one POST to
`{base_url}/chat/completions` with `response_format: {"type": "json_schema", ...}`
(structured outputs), greedy, a few hundred tokens at most, and a deadline on the whole call.

Plain HTTP (aiohttp, already a dependency) rather than the `openai` package: one request
shape is all the agent needs. Anything but a 200 with a message's content is a
`ModelUnavailable` naming why (refused, timed out, an HTTP error, a body that is not a chat
completion); the caller then falls back to the rules.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MAX_TOKENS = 256


class ModelUnavailable(RuntimeError):
    """No usable answer from the endpoint; the message says why. `usage`: the endpoint's
    token counts where it answered (an answer cut at the token limit)."""

    def __init__(self, message: str, usage: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.usage = usage or {}


@dataclass(frozen=True)
class ModelEndpoint:
    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # None: the first model the endpoint lists
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--agent-base-url {self.base_url!r}: expected http(s)://HOST/v1")
        if not self.timeout_s > 0:
            raise ValueError(f"--agent-timeout-s must be > 0, got {self.timeout_s}")
        if self.max_tokens < 16:
            raise ValueError(f"--agent-max-tokens must be >= 16, got {self.max_tokens}")


@dataclass(frozen=True)
class ModelAnswer:
    content: str
    model: str
    latency_s: float
    completion_tokens: int | None
    prompt_tokens: int | None


def _headers(ep: ModelEndpoint) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if ep.api_key:
        h["Authorization"] = f"Bearer {ep.api_key}"
    return h


async def _first_model(session: aiohttp.ClientSession, ep: ModelEndpoint) -> str:
    async with session.get(ep.base_url.rstrip("/") + "/models", headers=_headers(ep)) as r:
        if r.status != 200:
            raise ModelUnavailable(f"GET /models answered HTTP {r.status}")
        data = (await r.json()).get("data") or []
        if not data:
            raise ModelUnavailable("the endpoint lists no model")
        return str(data[0]["id"])


async def _chat(ep: ModelEndpoint, messages: list[dict[str, str]],
                schema: dict[str, Any]) -> ModelAnswer:
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=ep.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model = ep.model or await _first_model(session, ep)
        body = {"model": model, "messages": messages, "temperature": 0.0,
                "max_tokens": ep.max_tokens, "seed": 0, "frequency_penalty": 1.0,
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "recommendation", "schema": schema, "strict": True}}}
        async with session.post(ep.base_url.rstrip("/") + "/chat/completions",
                                headers=_headers(ep), data=json.dumps(body)) as r:
            text = await r.text()
            if r.status != 200:
                raise ModelUnavailable(f"HTTP {r.status}: {text[:200]}")
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        content = choice["message"]["content"]
        usage = data.get("usage") or {}
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelUnavailable(f"not a chat completion: {text[:200]!r}") from None
    if not isinstance(content, str):
        raise ModelUnavailable("the completion has no text content")
    if choice.get("finish_reason") == "length":
        raise ModelUnavailable(f"the answer was cut at max_tokens={ep.max_tokens}", usage)
    return ModelAnswer(content, str(data.get("model", model)), time.perf_counter() - t0,
                       usage.get("completion_tokens"), usage.get("prompt_tokens"))


def ask_model(ep: ModelEndpoint, messages: list[dict[str, str]],
              schema: dict[str, Any]) -> ModelAnswer:
    """One chat completion under `schema`, within `ep.timeout_s`; ModelUnavailable if none.
    Blocking: call it from a thread of its own, never the engine's or the server's loop."""
    try:
        return asyncio.run(asyncio.wait_for(_chat(ep, messages, schema), ep.timeout_s + 1.0))
    except ModelUnavailable:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        raise ModelUnavailable(f"no answer within {ep.timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise ModelUnavailable(f"endpoint unreachable: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise ModelUnavailable(f"endpoint unreachable: {e}") from None
