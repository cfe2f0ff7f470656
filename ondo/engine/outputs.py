"""What the engine hands back to callers, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}
    cumulative_logprob: float | None = None
    # What this step added; a streaming client sends these.
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[dict[int, float]] | None = None
    # Finished by a token (EOS, a stop token id) whose text is not in `text`: the last of
    # `token_ids` (include_stop_str_in_output keeps it, and this is False).
    stop_token_hidden: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# One streamed step of a request past its first output, as the engine process sends it:
# (request_id, metrics or None if unchanged, ((index, new_text, new_token_ids, new_logprobs,
# cumulative_logprob, stop_reason, stop_token_hidden), ...)); stop_token_hidden because a
# completion of an n > 1 request can end before the request does. The receiver holds the
# prompt and the text so far and rebuilds the RequestOutput (engine_process.WireDecoder).
WireDelta = tuple


def wire_delta(request_id: str, index: int, new_token_ids: list[int]) -> WireDelta:
    """The wire tuple of a plain step: new token ids only, metrics unchanged."""
    return (request_id, None, ((index, "", new_token_ids, None, None, None, False),))


def coalesce(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive outputs of a request: the later one's state
    carrying both deltas (for a reader that fell behind the engine). Reuses `later`."""
    before = {c.index: c for c in earlier.outputs}
    for c in later.outputs:
        e = before.pop(c.index, None)
        if e is None:
            continue
        c.new_text = e.new_text + c.new_text
        c.new_token_ids = e.new_token_ids + c.new_token_ids
        if e.new_logprobs is not None or c.new_logprobs is not None:
            c.new_logprobs = (e.new_logprobs or []) + (c.new_logprobs or [])
    if before:  # completions the later output does not carry
        later.outputs = sorted([*later.outputs, *before.values()], key=lambda c: c.index)
    return later
