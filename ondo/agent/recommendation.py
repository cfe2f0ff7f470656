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

MAX_RATIONALE_CHARS = 400
MAX_EVIDENCE = 4
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


def recommendation_schema(actions: Sequence[str], event_ids: Sequence[int],
                          runbooks: Iterable[Runbook], limits: GpuLimits) -> dict[str, Any]:
    """The JSON schema of an answer: one object variant per allowed action."""
    for a in actions:
        if a not in ACTIONS:
            raise ValueError(f"action {a!r} is not one of {', '.join(ACTIONS)}")
    books = list(runbooks)
    sections = sorted({s.section for b in books for s in b.sections})
    params = param_schemas(limits)
    common = {
        "runbook": {"type": "object", "properties": {
            "id": {"type": "string", "enum": [b.id for b in books]},
            "section": {"type": "string", "enum": sections}},
            "required": ["id", "section"], "additionalProperties": False},
        "evidence_event_ids": {"type": "array", "items": {"type": "integer",
                                                          "enum": sorted(set(event_ids))},
                               "minItems": 1, "maxItems": MAX_EVIDENCE},
        "urgency": {"type": "string", "enum": list(URGENCIES)},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "rationale": {"type": "string", "minLength": 1, "maxLength": MAX_RATIONALE_CHARS},
    }

    def variant(action: str) -> dict[str, Any]:
        props = {"runbook": common["runbook"], "action": {"type": "string", "const": action},
                 "params": params[action]}
        props.update({k: v for k, v in common.items() if k != "runbook"})
        return {"type": "object", "properties": props, "required": list(FIELDS),
                "additionalProperties": False}

    variants = [variant(a) for a in dict.fromkeys(actions)]
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
    if not isinstance(why, str) or not why.strip() or len(why) > MAX_RATIONALE_CHARS:
        raise InvalidRecommendation(f"rationale: a non-empty text of at most "
                                    f"{MAX_RATIONALE_CHARS} characters is needed")
    return Recommendation(action, params, why.strip(), tuple(dict.fromkeys(ids)), book.id,
                          rb["section"], float(conf), obj["urgency"], "model", model)
