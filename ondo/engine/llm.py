"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
import logging
import numbers
from collections.abc import Sequence as Seq
from typing import Any

from ondo.engine.config import EngineArgs
from ondo.engine.llm_engine import LLMEngine
from ondo.engine.outputs import CompletionOutput, RequestOutput
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.structured_outputs import check as check_structured_outputs

log = logging.getLogger(__name__)

Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineArgs.from_kwargs(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in input order. A prompt that cannot run (too long, bad ids) gets an
        output with finish_reason "error" and the message in `error`; the others run. What
        is no prompt at all (None, a number, a list of strings and numbers) raises TypeError
        naming it, before anything runs."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, Seq) or isinstance(prompts, bytes):
            raise TypeError(f"prompts must be a prompt or a sequence of prompts, not {type(prompts).__name__}; "
                            f"{PROMPT_KINDS}")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            _check_prompt(prompt, i)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for prompt, params in zip(prompts, params_list):
            rid = f"gen-{next(self._ids)}"
            order.append(rid)
            text, ids = _split_prompt(prompt)
            try:
                if params.structured_outputs is not None:
                    check_structured_outputs(params.structured_outputs)  # bad input: an error output
                self.engine.add_request(rid, text, params, prompt_token_ids=ids, stream=False)
            except ValueError as e:
                log.warning("request %s rejected: %s", rid, e)
                results[rid] = RequestOutput(
                    rid, text, list(ids or []),
                    [CompletionOutput(i, "", [], finish_reason="error", stop_reason=str(e))
                     for i in range(params.n)],
                    True, error=str(e),
                )
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[rid] for rid in order]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Each conversation through the chat template, then `generate`. As vLLM's:
        continue_final_message leaves the last message open for the model to go on with
        (an assistant's prefill), and needs add_generation_prompt=False."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "true: pass add_generation_prompt=False")
        if not isinstance(messages, list):
            raise TypeError(f"messages must be a list of message dicts (or a list of such lists), "
                            f"not {type(messages).__name__}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        conversations = [_template_conversation(c, i if len(conversations) > 1 else None)
                         for i, c in enumerate(conversations)]
        prompts = [
            {"prompt_token_ids": self.tokenizer.apply_chat_template(
                c, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker processes (nothing to do with one rank)."""
        self.engine.close()


PROMPT_KINDS = "a prompt is a string, a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'"


def _check_prompt(prompt: Any, index: int) -> None:
    """TypeError naming prompts[index] where it is no kind of prompt. Its values are the
    engine's to check (a bad id gets an error output, as in `generate`): nothing here walks
    a prompt's tokens, which would cost a long batch seconds."""
    if isinstance(prompt, (str, dict)) or (isinstance(prompt, Seq) and not isinstance(prompt, bytes)):
        return
    raise TypeError(f"prompts[{index}] is {type(prompt).__name__} {prompt!r:.60}: {PROMPT_KINDS}")


def _template_conversation(conversation: Any, index: int | None) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it: a list of messages with a role and
    content, a content of text parts joined by newlines and an assistant's tool calls with
    no content given "" (as the server hands them over). ValueError naming the message
    otherwise."""
    where = "messages" if index is None else f"messages[{index}]"
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where} must be a non-empty list of messages")
    out = []
    for j, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise ValueError(f"{where}[{j}] is {type(message).__name__}, not a message dict")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where}[{j}] has no role (a string: system, user, assistant, tool)")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if None in texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{where}[{j}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            message = {**message, "content": "\n".join(texts)}
        elif content is None and message["role"] == "assistant" and message.get("tool_calls"):
            message = {**message, "content": ""}  # as the server hands templates a tool call
        elif not isinstance(content, str):
            raise ValueError(f"{where}[{j}] has no content (a string or a list of text parts)")
        out.append(message)
    return out


def _split_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
        return prompt.get("prompt"), None
    return None, _token_ids(prompt)


def _token_ids(ids: Any) -> list[int]:
    """The ids as a list; numpy's integers made Python ints (judged by the first id, so that
    a list of Python ints is copied and nothing more). Anything else is left for the engine
    to refuse."""
    ids = list(ids)
    if ids and not isinstance(ids[0], int) and isinstance(ids[0], numbers.Integral):
        return [int(t) if isinstance(t, numbers.Integral) else t for t in ids]
    return ids
