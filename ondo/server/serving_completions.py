"""POST /v1/completions: one prompt or a list (text or token ids), streamed or not; n
completions of each (choice index = prompt index * n + completion index, as OpenAI's)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from ondo.engine.outputs import RequestOutput
from ondo.model.detokenizer import IncrementalDetokenizer
from ondo.server.errors import bad_request
from ondo.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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
    merge,
    sse,
    sse_error,
    top_n,
    until_disconnected,
    usage,
)
from ondo.server.sse_chunks import TextChunks
from ondo.server.structured_request import structured_outputs


async def _prompts(ctx: ServingContext, prompt: object) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) per prompt, validated."""
    if isinstance(prompt, str):
        items: list[object] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    elif isinstance(prompt, list):
        items = list(prompt)
    else:
        raise bad_request("prompt must be a string, a list of strings, or token ids", "prompt")
    if not items:
        raise bad_request("prompt must not be an empty list", "prompt")
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = await ctx.encode(item, param)
            ctx.check_token_ids(ids, param)
            out.append((item, ids))
        else:
            ids = list(item)  # type: ignore[call-overload]
            ctx.check_token_ids(ids, param)
            out.append((None, ids))
    return out


class _TextOffsets:
    """Where each output token's text starts in its choice's text: the length of the text
    the tokens before it made, through the detokenizer the text itself comes from. A
    token that only starts a character starts where the character does, and a stop token
    whose text is left out starts at the end. Without a tokenizer, the decoded tokens'
    lengths add up."""

    def __init__(self, ctx: ServingContext, prompt_token_ids: list[int],
                 skip_special_tokens: bool) -> None:
        tokenizer = ctx.async_llm.tokenizer
        self._detokenizer = (None if tokenizer is None else
                             IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens))
        self.length = 0

    def next(self, token_id: int, token: str) -> int:
        """The offset of `token_id` (decoded alone: `token`), which follows the last one."""
        offset = self.length
        made = token if self._detokenizer is None else self._detokenizer.append(token_id)
        self.length += len(made)
        return offset


def _logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[dict[int, float]] | None,
              num_top: int, offsets: _TextOffsets) -> CompletionLogprobs:
    """The legacy logprobs object. Each token's top_logprobs are the num_top most likely
    tokens and the sampled one (up to num_top + 1), as OpenAI's and vLLM's."""
    lp = CompletionLogprobs()
    for token_id, candidates in zip(token_ids, logprobs or []):
        token = ctx.decode_token(token_id)
        lp.tokens.append(token)
        lp.token_logprobs.append(clamp_logprob(candidates.get(token_id, float("-inf"))))
        top = top_n(candidates, num_top)
        if token_id in candidates and all(t != token_id for t, _ in top):
            top.append((token_id, candidates[token_id]))
        lp.top_logprobs.append({ctx.decode_token(t): clamp_logprob(v) for t, v in top})
        lp.text_offset.append(offsets.next(token_id, token))
    return lp


async def create_completion(ctx: ServingContext, body: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs would need prompt logprobs, which are not "
                          "supported; drop one of them", "echo")
    structured, _ = structured_outputs(body)
    prompts = await _prompts(ctx, body.prompt)
    params = []
    for i, (_, ids) in enumerate(prompts):
        prompt_param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        max_tokens = ctx.resolve_max_tokens(len(ids), body.max_tokens, "max_tokens", prompt_param)
        params.append(ctx.sampling_params(body, max_tokens, body.logprobs, {}, structured))
    n = params[0].n
    request_id = random_id("cmpl")
    streams = [ctx.generate(f"{request_id}-{i}", ids, p)
               for i, ((_, ids), p) in enumerate(zip(prompts, params))]
    merged = merge(streams)
    echo = [(text if text is not None else await ctx.decode(ids)) if body.echo else ""
            for text, ids in prompts]
    num_top = body.logprobs or 0
    try:
        if body.stream:
            first = await until_disconnected(raw, first_item(merged))
            return StreamingResponse(
                _stream(ctx, body, request_id, prompts, params[0].skip_special_tokens, echo,
                        num_top, n, first, merged),
                media_type="text/event-stream")
        finals = await until_disconnected(raw, _collect(merged, len(prompts)))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted
    except Exception as e:
        raise as_api_error(e) from e
    choices = []
    completion_tokens = 0
    for i, out in enumerate(finals):
        check_finished_ok(out)
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            choices.append(CompletionChoice(
                index=i * n + c.index, text=echo[i] + c.text, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                logprobs=(_logprobs(ctx, c.token_ids, c.logprobs, num_top,
                                    _TextOffsets(ctx, prompts[i][1], params[i].skip_special_tokens))
                          if body.logprobs is not None else None)))
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    return CompletionResponse(id=request_id, model=ctx.model_name, choices=choices,
                              usage=usage(prompt_tokens, completion_tokens))


async def _collect(merged: AsyncIterator[tuple[int, RequestOutput]], n: int) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * n
    async for index, out in merged:
        if out.finished:
            finals[index] = out
    missing = [i for i, f in enumerate(finals) if f is None]
    if missing:
        raise RuntimeError(f"prompts {missing} ended without a final output")
    return finals  # type: ignore[return-value]


async def _stream(ctx: ServingContext, body: CompletionRequest, request_id: str,
                  prompts: list[tuple[str | None, list[int]]], skip_special_tokens: bool,
                  echo: list[str], num_top: int, n: int, first: tuple[int, RequestOutput] | None,
                  merged: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    created = CompletionResponse(id=request_id, model=ctx.model_name, choices=[]).created
    completion_tokens = 0
    # By choice index (prompt index * n + completion index).
    offsets = [_TextOffsets(ctx, prompts[i // n][1], skip_special_tokens)
               for i in range(len(prompts) * n)] if body.logprobs is not None else []
    echoed = [not echo[i // n] for i in range(len(prompts) * n)]
    done = [False] * (len(prompts) * n)  # its finish_reason went out (n > 1: one ends first)
    text_chunk = TextChunks(lambda index, text: CompletionResponse(
        id=request_id, created=created, model=ctx.model_name,
        choices=[CompletionChoice(index=index, text=text)]))

    async def items() -> AsyncIterator[tuple[int, RequestOutput]]:
        if first is not None:
            yield first
        async for item in merged:
            yield item

    try:
        async for prompt_index, out in items():
            check_finished_ok(out)
            for c in out.outputs:
                index = prompt_index * n + c.index
                if done[index]:
                    continue
                done[index] = c.finished
                completion_tokens += len(c.new_token_ids)
                text = c.new_text
                if not echoed[index]:
                    text, echoed[index] = echo[prompt_index] + text, True
                if not text and not c.finished and (body.logprobs is None or not c.new_token_ids):
                    continue
                lp = None
                if body.logprobs is not None:
                    lp = _logprobs(ctx, c.new_token_ids, c.new_logprobs, num_top, offsets[index])
                if lp is None and not c.finished:
                    yield text_chunk(index, text)
                    continue
                chunk = CompletionResponse(
                    id=request_id, created=created, model=ctx.model_name,
                    choices=[CompletionChoice(index=index, text=text, logprobs=lp,
                                              finish_reason=c.finish_reason if c.finished else None,
                                              stop_reason=c.stop_reason if c.finished else None)])
                yield sse(chunk)
        if body.stream_options and body.stream_options.include_usage:
            prompt_tokens = sum(len(ids) for _, ids in prompts)
            yield sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name,
                                         choices=[], usage=usage(prompt_tokens, completion_tokens)))
    except Exception as e:
        yield sse_error(e)
    finally:
        await merged.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE
