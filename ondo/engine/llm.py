"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
import logging
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
        output with finish_reason "error" and the message in `error`; the others run."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
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
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.tokenizer.apply_chat_template(c, add_generation_prompt=True)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker processes (nothing to do with one rank)."""
        self.engine.close()


def _split_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return prompt.get("prompt"), None
    return None, list(prompt)
