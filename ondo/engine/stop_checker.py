"""When a sequence is done: EOS, stop token ids, stop strings, a complete structured output,
max_tokens, max_model_len."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopDecision:
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: str | int | None = None
    truncate_text_to: int | None = None  # where the visible text ends, for a stop string


def check_stop(
    *,
    token_id: int,
    num_output_tokens: int,
    num_tokens: int,
    text: str,
    new_text_len: int,
    eos_token_ids: list[int],
    stop_token_ids: list[int],
    stop_strings: list[str],
    include_stop_str: bool,
    ignore_eos: bool,
    min_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    grammar_complete: bool = False,
) -> StopDecision:
    """`grammar_complete`: the output is a whole sentence of its grammar and nothing but EOS
    may follow, so it ends ("stop") whatever min_tokens and ignore_eos say: a token past
    it could only break it."""
    if num_output_tokens >= min_tokens:
        if not ignore_eos and token_id in eos_token_ids:
            return StopDecision("stop", None)
        if token_id in stop_token_ids:
            return StopDecision("stop", token_id)
        if stop_strings:
            # Only the tail that could contain a new match needs searching.
            longest = max(len(s) for s in stop_strings)
            start = max(0, len(text) - new_text_len - longest + 1)
            best: tuple[int, str] | None = None
            for s in stop_strings:
                i = text.find(s, start)
                if i != -1 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                i, s = best
                end = i + len(s) if include_stop_str else i
                return StopDecision("stop", s, end)
    if grammar_complete:
        return StopDecision("stop")
    if max_tokens is not None and num_output_tokens >= max_tokens:
        return StopDecision("length")
    if num_tokens >= max_model_len:
        return StopDecision("length")
    return StopDecision()
