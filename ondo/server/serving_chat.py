"""POST /v1/chat/completions: the model's chat template, then one generation (n choices),
streamed or not; tools as `ondo.server.tool_calls` serves them."""

from __future__ import annotations

import json
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
from ondo.server.sse_chunks import TextChunks
from ondo.server.structured_request import structured_outputs
from ondo.server.tool_calls import (
    ToolPlan,
    ToolStream,
    hermes_system_prompt,
    parse_output,
    plan_tools,
)


def template_messages(messages: list[ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """OpenAI messages as the chat template wants them: text content only."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise bad_request(f"content part type {part.type!r} is not supported: only "
                                      "text parts", f"{param}[{i}].content[{j}]")
                if part.text is None:
                    raise bad_request("a text part needs its text: {'type': 'text', 'text': ...}",
                                      f"{param}[{i}].content[{j}].text")
                texts.append(part.text)
            content = "\n".join(texts)
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier call as chat templates expect it: arguments as an object, not JSON text."""
    if not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "function": function}


def chat_template_text(ctx: ServingContext) -> str | None:
    template = getattr(ctx.tokenizer.hf_tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


async def chat_prompt_ids(ctx: ServingContext, messages: list[ChatMessage],
                          add_generation_prompt: bool | None, param: str = "messages",
                          tools: ToolPlan | None = None,
                          continue_final_message: bool | None = False) -> list[int]:
    """The chat template rendered and tokenized off the event loop (see AsyncTokenizer).
    continue_final_message (vLLM's): the last message stays open and the model goes on
    with it (an assistant's prefill); it excludes add_generation_prompt, whose default
    (true) it then turns off unless the request set it."""
    continue_final = continue_final_message is True
    if continue_final and add_generation_prompt is True:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true: "
                          "set add_generation_prompt to false", "continue_final_message")
    msgs = template_messages(messages, param)
    tokenizer = ctx.async_tokenizer
    template_tools = tools.template_tools if tools is not None else None
    if template_tools and not tools.template_renders_tools:
        # The template does not show tools to the model: describe them in the system message.
        prompt = hermes_system_prompt(tools.tools)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{prompt}".lstrip()}
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
        template_tools = None
    try:
        ids = await tokenizer.apply_chat_template(
            msgs, add_generation_prompt is not False and not continue_final, tools=template_tools,
            continue_final_message=continue_final)
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
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    structured, field = structured_outputs(body)
    tools = plan_tools(body, chat_template_text(ctx)) if body.tools or body.tool_choice else None
    if tools is not None and tools.mode != "none":
        if structured is not None:
            raise bad_request(f"{field} and tools both constrain the output: drop one, or set "
                              "tool_choice to 'none'", field)
        structured = tools.structured
    ids = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt, tools=tools,
                                continue_final_message=body.continue_final_message)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = ctx.resolve_max_tokens(len(ids), requested, param, "messages")
    num_top = body.top_logprobs or 0
    params = ctx.sampling_params(body, max_tokens, num_top if body.logprobs else None,
                                 {"max_tokens": param, "logprobs": "top_logprobs"}, structured)
    request_id = random_id("chatcmpl")
    stream = ctx.generate(request_id, ids, params)
    try:
        if body.stream:
            first = await until_disconnected(raw, first_item(stream))
            return StreamingResponse(_stream(ctx, body, request_id, len(ids), num_top, params.n, tools,
                                             first, stream),
                                     media_type="text/event-stream")
        final = await until_disconnected(raw, _last(stream))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted
    except Exception as e:
        raise as_api_error(e) from e
    check_finished_ok(final)
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        content, calls = parse_output(tools, c.text) if tools is not None else (c.text, [])
        finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        choices.append(ChatChoice(
            index=c.index, message=ChatResponseMessage(content=content, tool_calls=calls or None),
            finish_reason=finish, stop_reason=c.stop_reason,
            logprobs=_logprobs(ctx, c.token_ids, c.logprobs, num_top) if body.logprobs else None))
    return ChatCompletionResponse(id=request_id, model=ctx.model_name, choices=choices,
                                  usage=usage(len(ids), sum(len(c.token_ids) for c in final.outputs)))


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None or not last.finished:
        raise RuntimeError("the request ended without a final output")
    return last


async def _stream(ctx: ServingContext, body: ChatCompletionRequest, request_id: str,
                  prompt_tokens: int, num_top: int, n: int, tools: ToolPlan | None,
                  first: RequestOutput | None,
                  stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    created = ChatCompletionResponse(id=request_id, model=ctx.model_name, choices=[],
                                     usage=usage(0, 0)).created

    def chunk(delta: DeltaMessage, index: int = 0, **fields: Any) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                       choices=[ChatStreamChoice(index=index, delta=delta, **fields)]))

    text_chunk = TextChunks(lambda index, text: ChatCompletionChunk(
        id=request_id, created=created, model=ctx.model_name,
        choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=text))]))

    async def outputs() -> AsyncIterator[RequestOutput]:
        if first is not None:
            yield first
        async for out in stream:
            yield out

    completion_tokens = 0
    for index in range(n):
        yield chunk(DeltaMessage(role="assistant", content=""), index)
    done = [False] * n  # its finish_reason went out (n > 1: one ends before the others)
    parsers = [ToolStream(tools) if tools is not None else None for _ in range(n)]
    try:
        async for out in outputs():
            check_finished_ok(out)
            for c in out.outputs:
                if done[c.index]:
                    continue
                done[c.index] = c.finished
                completion_tokens += len(c.new_token_ids)
                text, calls = c.new_text, None
                parser = parsers[c.index]
                if parser is not None:
                    text, deltas = parser.feed(c.new_text, c.finished)
                    calls = deltas or None
                if not text and not calls and not c.finished and not (body.logprobs and c.new_token_ids):
                    continue
                lp = _logprobs(ctx, c.new_token_ids, c.new_logprobs, num_top) if body.logprobs else None
                if lp is None and calls is None and not c.finished:
                    yield text_chunk(c.index, text)
                    continue
                finish = c.finish_reason if c.finished else None
                if finish == "stop" and parser is not None and parser.num_calls:
                    finish = "tool_calls"
                yield chunk(DeltaMessage(content=text or None if (c.finished or calls) else text,
                                         tool_calls=calls),
                            c.index, logprobs=lp, finish_reason=finish,
                            stop_reason=c.stop_reason if c.finished else None)
        if body.stream_options and body.stream_options.include_usage:
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                          choices=[], usage=usage(prompt_tokens, completion_tokens)))
    except Exception as e:
        yield sse_error(e)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE
