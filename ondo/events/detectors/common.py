"""What every detector shares: names for the evidence an event rests on, episode keys, and
the event that closes a condition."""

from __future__ import annotations

from typing import Any

from ondo.events.canonical import canonical_float, canonical_json
from ondo.events.schema import EventDraft, EventKind


def gpu_ref(gpu_index: int, t_s: float) -> str:
    return f"gpu:{gpu_index}@{canonical_float(t_s)}"


def step_ref(step_index: int) -> str:
    return f"step:{step_index}"


def request_ref(request_id: str) -> str:
    return f"request:{request_id}"


def twin_ref(gpu_index: int, t_s: float) -> str:
    return f"twin:{gpu_index}@{canonical_float(t_s)}"


def episode_key(kind: EventKind, subject: dict[str, Any]) -> str:
    """The name under which the log links an episode's opening and closing events."""
    return f"{kind.value}/{canonical_json(subject)}"


def opened(kind: EventKind, t_s: float, t_wall_s: float, subject: dict[str, Any],
           payload: dict[str, Any], evidence: tuple[str, ...], severity=None) -> EventDraft:
    return EventDraft(kind, t_s, t_wall_s, subject, payload, evidence, severity,
                      opens=episode_key(kind, subject))


def cleared(kind: EventKind, t_s: float, t_wall_s: float, subject: dict[str, Any],
            started_s: float, ended_s: float, summary: dict[str, Any],
            evidence: tuple[str, ...] = ()) -> EventDraft:
    """The condition_cleared event of an episode `kind` opened for `subject`."""
    return EventDraft(
        EventKind.CONDITION_CLEARED, t_s, t_wall_s, subject,
        {"kind": kind.value, "started_s": started_s, "ended_s": ended_s,
         "duration_s": ended_s - started_s, "summary": summary},
        evidence, closes=episode_key(kind, subject))
