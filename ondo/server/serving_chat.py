"""POST /v1/chat/completions: the model's chat template, then one generation, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from ondo.engine.outputs import RequestOutput
from ondo.server.errors import bad_request
from ondo.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    random_id,
)
from ondo.server.serving import (
    SSE_DONE,
    ClientDisconnected,
    ServingContext,
    as_api_error,
    check_finished_ok,
    clamp_logprob,
    first_item,
    sse,
    sse_error,
    top_n,
    until_disconnected,
    usage,
)


def template_messages(messages: list[ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """OpenAI messages as the chat template wants them: text content only."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"content part type {part.type!r} is not supported: only "
                                      "text parts", f"{param}[{i}].content[{j}]")
                texts.append(part.text)
            content = "\n".join(texts)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content or ""})
    return out


async def chat_prompt_ids(ctx: ServingContext, messages: list[ChatMessage],
                          add_generation_prompt: bool, param: str = "messages") -> list[int]:
    """The chat template rendered and tokenized off the event loop (see AsyncTokenizer)."""
    msgs = template_messages(messages, param)
    tokenizer = ctx.async_tokenizer
    try:
        ids = await tokenizer.apply_chat_template(msgs, add_generation_prompt)
    except Exception as e:  # jinja raises its own kinds on messages a template refuses
        raise bad_request(f"cannot apply the chat template to {param}: {e}", param) from e
    ctx.check_token_ids(list(ids), param)
    return list(ids)


def _logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[dict[int, float]] | None,
              num_top: int) -> ChatLogprobs:
    content = []
    for token_id, candidates in zip(token_ids, logprobs or []):
        token = ctx.decode_token(token_id)
        top = []
        for t, v in top_n(candidates, num_top):
            s = ctx.decode_token(t)
            top.append(TopLogprob(token=s, logprob=clamp_logprob(v), bytes=list(s.encode())))
        content.append(ChatTokenLogprob(
            token=token, logprob=clamp_logprob(candidates.get(token_id, float("-inf"))),
            bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest,
                                 raw: Request) -> Response:
    ctx.check_model(body.model)
    if body.tools:
        raise bad_request("tool calling is not supported", "tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(f"response_format type {body.response_format.type!r} is not supported: "
                          "only 'text'", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    ids = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt is not False)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = ctx.resolve_max_tokens(len(ids), requested, param, "messages")
    num_top = body.top_logprobs or 0
    params = ctx.sampling_params(body, max_tokens, num_top if body.logprobs else None,
                                 {"max_tokens": param, "logprobs": "top_logprobs"})
    request_id = random_id("chatcmpl")
    stream = ctx.generate(request_id, ids, params)
    try:
        if body.stream:
            first = await until_disconnected(raw, first_item(stream))
            return StreamingResponse(_stream(ctx, body, request_id, len(ids), num_top, first, stream),
                                     media_type="text/event-stream")
        final = await until_disconnected(raw, _last(stream))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted
    except Exception as e:
        raise as_api_error(e) from e
    check_finished_ok(final)
    c = final.outputs[0]
    return ChatCompletionResponse(
        id=request_id, model=ctx.model_name,
        choices=[ChatChoice(
            index=0, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            logprobs=_logprobs(ctx, c.token_ids, c.logprobs, num_top) if body.logprobs else None)],
        usage=usage(len(ids), len(c.token_ids)))


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None or not last.finished:
        raise RuntimeError("the request ended without a final output")
    return last


async def _stream(ctx: ServingContext, body: ChatCompletionRequest, request_id: str,
                  prompt_tokens: int, num_top: int, first: RequestOutput | None,
                  stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    created = ChatCompletionResponse(id=request_id, model=ctx.model_name, choices=[],
                                     usage=usage(0, 0)).created

    def chunk(delta: DeltaMessage, **fields: Any) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                       choices=[ChatStreamChoice(index=0, delta=delta, **fields)]))

    async def outputs() -> AsyncIterator[RequestOutput]:
        if first is not None:
            yield first
        async for out in stream:
            yield out

    completion_tokens = 0
    yield chunk(DeltaMessage(role="assistant", content=""))
    try:
        async for out in outputs():
            check_finished_ok(out)
            c = out.outputs[0]
            completion_tokens += len(c.new_token_ids)
            if not c.new_text and not c.finished and not (body.logprobs and c.new_token_ids):
                continue
            lp = _logprobs(ctx, c.new_token_ids, c.new_logprobs, num_top) if body.logprobs else None
            yield chunk(DeltaMessage(content=c.new_text or None if c.finished else c.new_text),
                        logprobs=lp, finish_reason=c.finish_reason if c.finished else None,
                        stop_reason=c.stop_reason if c.finished else None)
        if body.stream_options and body.stream_options.include_usage:
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                          choices=[], usage=usage(prompt_tokens, completion_tokens)))
    except Exception as e:
        yield sse_error(e)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE
