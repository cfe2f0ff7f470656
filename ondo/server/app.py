"""The OpenAI-compatible FastAPI app over an `AsyncLLM`.

`build_app(async_llm, served_model_name, api_key=None)`. The app does not own the
engine: whoever built the AsyncLLM shuts it down (see `ondo.server.cli`).
"""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ondo.engine.async_llm import AsyncLLM
from ondo.server.errors import APIError, bad_request, install_error_handlers
from ondo.server.limits import BodySizeLimit, RequestLimits
from ondo.server.metrics import ServerMetrics
from ondo.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from ondo.server.serving import ServingContext
from ondo.server.serving_chat import chat_prompt_ids, create_chat_completion
from ondo.server.serving_completions import create_completion

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}


def build_app(async_llm: AsyncLLM, served_model_name: str, api_key: str | None = None,
              registry: CollectorRegistry | None = None,
              limits: RequestLimits | None = None) -> FastAPI:
    registry = registry or CollectorRegistry()
    limits = limits or RequestLimits()
    metrics = ServerMetrics(registry, served_model_name, async_llm.stats)
    ctx = ServingContext(async_llm, served_model_name, metrics, limits)
    app = FastAPI(title="ondo", summary="OpenAI-compatible LLM server")
    app.state.ctx = ctx
    app.state.registry = registry
    # Read per request: the limits may be set after the app is built (ondo serve does).
    app.add_middleware(BodySizeLimit, max_bytes=lambda: ctx.limits.max_request_bytes)
    install_error_handlers(app)

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    v1 = [Depends(check_api_key)]

    @app.post("/v1/completions", dependencies=v1, response_model=CompletionResponse,
              responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions", dependencies=v1, response_model=ChatCompletionResponse,
              responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.get("/v1/models", dependencies=v1, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name, root=served_model_name,
                                         max_model_len=async_llm.max_model_len)])

    @app.get("/v1/models/{model_id:path}", dependencies=v1, response_model=ModelCard,
             responses=_ERRORS)
    async def model(model_id: str) -> ModelCard:
        ctx.check_model(model_id)
        return ModelCard(id=served_model_name, root=served_model_name,
                         max_model_len=async_llm.max_model_len)

    @app.get("/health")
    async def health() -> Response:
        """Readiness: 200 while requests are taken; 503 while the engine restarts, once it
        is gone, and while the server drains."""
        why = async_llm.unhealthy_reason
        if why is None:
            return JSONResponse({"status": "ok"})
        return APIError(503, f"unhealthy: {why}", code="unavailable",
                        headers={"Retry-After": "5"}).response()

    @app.get("/health/live")
    async def live() -> Response:
        """Liveness: 200 whenever this process answers HTTP, the engine restarting or not
        (the process exits by itself when the engine is gone for good)."""
        return JSONResponse({"status": "alive"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages must not be empty", "messages")
            ids = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt,
                                        continue_final_message=body.continue_final_message)
        else:
            ids = await ctx.encode(body.prompt or "", "prompt", body.add_special_tokens is not False)
        return TokenizeResponse(count=len(ids), max_model_len=async_llm.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        tokenizer = ctx.tokenizer
        vocab = min(tokenizer.vocab_size, async_llm.vocab_size)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: ids must be in [0, {vocab})",
                              "tokens")
        return DetokenizeResponse(prompt=await ctx.decode(body.tokens))

    return app
