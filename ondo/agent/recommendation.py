"""`Recommendation`: what the agent proposes, its JSON schema, and the check every answer
passes before it is believed.

    {"runbook": {"id": "power-cap-sustained", "section": "actions"},
     "action": "set_power_budget", "params": {"power_budget_w": 630},
     "evidence_event_ids": [2], "urgency": "medium", "confidence": 0.8,
     "rationale": "..."}

The schema the model answers under (structured outputs) is built per incident: `action`
from the allowed set (narrowed to what the retrieved runbooks propose, plus page_human and
no_action), one variant per action so that `params` always fit the action, evidence ids
from the incident's own entries, runbook ids and sections from the knowledge base. The
check (`parse_recommendation`) does not trust the schema was enforced: it checks the same
things again against the fixed action set, the GPU's bounds, the log's entries and the
runbooks, and names the first field that fails.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ondo.agent.actions import (
    ACTIONS,
    URGENCIES,
    GpuLimits,
    ParamError,
    check_params,
    param_schemas,
)
from ondo.agent.runbook import Runbook

MAX_RATIONALE_CHARS = 160
MAX_EVIDENCE = 4
# Plain prose: letters, digits, spaces and ordinary punctuation (no braces, markup or code).
RATIONALE_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_ ,.;:%()/'+=-]{{9,{MAX_RATIONALE_CHARS - 1}}}$"
_NOT_PROSE = re.compile(r"[^A-Za-z0-9_ ,.;:%()/'+=-]")


def plain_rationale(text: str) -> str:
    """`text` as a rationale the pattern accepts: other characters become spaces, cut to
    the length."""
    out = re.sub(r"\s+", " ", _NOT_PROSE.sub(" ", text.replace("°C", "C"))).strip()
    return out[:MAX_RATIONALE_CHARS].rstrip()
FIELDS = ("runbook", "action", "params", "evidence_event_ids", "urgency", "confidence",
          "rationale")
SOURCES = ("model", "rules")


@dataclass(frozen=True)
class Recommendation:
    action: str
    params: dict[str, Any]
    rationale: str
    evidence_event_ids: tuple[int, ...]
    runbook_id: str
    runbook_section: str
    confidence: float
    urgency: str
    source: str  # "model" or "rules"
    model: str | None = None  # the model that answered (source "model")
    fallback_reason: str | None = None  # why the rules answered (source "rules")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "action": self.action, "params": dict(self.params), "rationale": self.rationale,
            "evidence_event_ids": list(self.evidence_event_ids),
            "runbook": {"id": self.runbook_id, "section": self.runbook_section},
            "confidence": self.confidence, "urgency": self.urgency, "source": self.source}
        if self.model is not None:
            d["model"] = self.model
        if self.fallback_reason is not None:
            d["fallback_reason"] = self.fallback_reason
        return d


class InvalidRecommendation(ValueError):
    """An answer that is not a valid recommendation; the message names the field."""


def rationale_pattern(prefix: str | None = None) -> str:
    """The rationale's pattern; with `prefix` (plain prose), a rationale that starts with it,
    then "; " and the model's own clause."""
    if not prefix:
        return RATIONALE_PATTERN
    room = MAX_RATIONALE_CHARS - len(prefix) - 3
    if room < 10:
        raise ValueError(f"a rationale prefix of {len(prefix)} characters leaves no room")
    literal = re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", prefix)
    return rf"^{literal}; [A-Za-z0-9][A-Za-z0-9_ ,.;:%()/'+=-]{{8,{room}}}$"


def recommendation_schema(proposals: Sequence[tuple[str, str]], event_ids: Sequence[int],
                          runbooks: Iterable[Runbook], limits: GpuLimits,
                          always: Sequence[str] = ("page_human", "no_action"),
                          rationale_prefix: str | None = None) -> dict[str, Any]:
    """The JSON schema of an answer. `proposals`: (runbook id, action) pairs, best first; an
    answer names a runbook, then one of that runbook's actions or one of `always` (with any
    of the runbooks), so that runbook, action and params always belong together. With
    `rationale_prefix`, the rationale starts with it (the incident's summary: a small model
    then states the facts rather than what it half-remembers)."""
    books = {b.id: b for b in runbooks}
    for rid, action in proposals:
        if action not in ACTIONS:
            raise ValueError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
        if rid not in books:
            raise ValueError(f"runbook {rid!r} is not among the runbooks given")
    params = param_schemas(limits)
    common = {
        "evidence_event_ids": {"type": "array", "items": {"type": "integer",
                                                          "enum": sorted(set(event_ids))},
                               "minItems": 1, "maxItems": MAX_EVIDENCE},
        "urgency": {"type": "string", "enum": list(URGENCIES)},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "rationale": {"type": "string", "pattern": rationale_pattern(rationale_prefix)},
    }

    def variant(rids: list[str], action: str) -> dict[str, Any]:
        sections = sorted({s.section for r in rids for s in books[r].sections})
        rb = {"type": "object", "properties": {
            "id": {"type": "string", "enum": rids} if len(rids) > 1
            else {"type": "string", "const": rids[0]},
            "section": {"type": "string", "enum": sections}},
            "required": ["id", "section"], "additionalProperties": False}
        props = {"runbook": rb, "action": {"type": "string", "const": action},
                 "params": params[action], **common}
        return {"type": "object", "properties": props, "required": list(FIELDS),
                "additionalProperties": False}

    variants = [variant([rid], a) for rid, a in dict.fromkeys(proposals) if a not in always]
    variants += [variant(list(books), a) for a in always]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def parse_recommendation(answer: str | dict[str, Any], *, event_ids: Iterable[int],
                         runbooks: dict[str, Runbook], limits: GpuLimits,
                         model: str | None = None) -> Recommendation:
    """The model's answer as a Recommendation (source "model"), or InvalidRecommendation."""
    if isinstance(answer, str):
        try:
            obj = json.loads(answer)
        except json.JSONDecodeError as e:
            raise InvalidRecommendation(f"the answer is not JSON: {e}") from None
    else:
        obj = answer
    if not isinstance(obj, dict):
        raise InvalidRecommendation(f"the answer must be a JSON object, got "
                                    f"{type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise InvalidRecommendation(f"field {missing[0]!r} is missing")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InvalidRecommendation(f"unknown field(s) {unknown}")
    action = obj["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        raise InvalidRecommendation(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
    try:
        params = check_params(action, obj["params"], limits)
    except ParamError as e:
        raise InvalidRecommendation(f"params: {e}") from None
    known = set(event_ids)
    ids = obj["evidence_event_ids"]
    if not isinstance(ids, list) or not ids or len(ids) > MAX_EVIDENCE:
        raise InvalidRecommendation(f"evidence_event_ids: 1 to {MAX_EVIDENCE} entry ids, "
                                    f"got {ids!r}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i not in known:
            raise InvalidRecommendation(f"evidence_event_ids: {i!r} is not an entry of this "
                                        f"incident ({sorted(known)})")
    rb = obj["runbook"]
    if not isinstance(rb, dict) or set(rb) != {"id", "section"}:
        raise InvalidRecommendation(f"runbook: expected {{id, section}}, got {rb!r}")
    book = runbooks.get(rb["id"]) if isinstance(rb["id"], str) else None
    if book is None:
        raise InvalidRecommendation(f"runbook.id: {rb['id']!r} is not a runbook")
    if not isinstance(rb["section"], str) or book.section(rb["section"]) is None:
        raise InvalidRecommendation(f"runbook.section: {rb['section']!r} is not a section of "
                                    f"{book.id}")
    conf = obj["confidence"]
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not math.isfinite(conf) \
            or not 0.0 <= conf <= 1.0:
        raise InvalidRecommendation(f"confidence: {conf!r} is not a number in [0, 1]")
    if obj["urgency"] not in URGENCIES:
        raise InvalidRecommendation(f"urgency: {obj['urgency']!r} is not one of "
                                    f"{', '.join(URGENCIES)}")
    why = obj["rationale"]
    if not isinstance(why, str) or not re.match(RATIONALE_PATTERN, why):
        raise InvalidRecommendation(f"rationale: plain prose of 10 to {MAX_RATIONALE_CHARS} "
                                    f"characters is needed, got {str(why)[:60]!r}")
    return Recommendation(action, params, why.strip(), tuple(dict.fromkeys(ids)), book.id,
                          rb["section"], float(conf), obj["urgency"], "model", model)
