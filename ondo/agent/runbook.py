"""Runbooks: Markdown files shipped in `ondo/agent/runbooks/`, each with a small front matter.

    ---
    id: power-cap-sustained
    title: Sustained power cap
    symptoms: [what an operator sees, ...]
    event_kinds: [power_cap_sustained, throttle_started]
    actions:                                    # the first is the one the rules propose
      - action: set_power_budget
        params: {power_budget_w: "0.9 * power_limit_w"}
    ---
    # Title
    ## Symptoms ...  ## Diagnosis ...  ## Actions ...  ## Verify ...

A parameter is a literal (number or text) or an expression over the incident's facts
(`ondo/agent/facts.py`): `NAME`, `K * NAME`, `NAME * K`, `NAME + K`, `NAME - K`. Each `##`
section is indexed for retrieval on its own; its id is the heading in lower case with
dashes (`actions`). A runbook that does not parse, names an unknown action or event kind,
or has parameters that do not fit the action is refused with the file and field named.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ondo.agent.actions import ACTIONS, param_schemas
from ondo.agent.facts import FACT_NAMES
from ondo.events.schema import EventKind

RUNBOOK_DIR = Path(__file__).with_name("runbooks")
_EXPR = re.compile(r"^\s*(?:(?P<k1>[0-9.]+)\s*\*\s*(?P<n1>[a-z_]+)|(?P<n2>[a-z_]+)\s*"
                   r"(?:(?P<op>[*+-])\s*(?P<k2>[0-9.]+))?)\s*$")
_KINDS = {k.value for k in EventKind}


class RunbookError(ValueError):
    """A runbook file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ActionTemplate:
    action: str
    params: dict[str, Any]  # literal values or expressions over facts


@dataclass(frozen=True)
class Section:
    runbook_id: str
    section: str  # heading slug: "symptoms", "actions", ...
    heading: str
    text: str

    @property
    def ref(self) -> str:
        return f"{self.runbook_id}#{self.section}"


@dataclass(frozen=True)
class Runbook:
    id: str
    title: str
    symptoms: tuple[str, ...]
    event_kinds: tuple[str, ...]
    actions: tuple[ActionTemplate, ...]
    sections: tuple[Section, ...]
    path: str

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.section == name), None)


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def parse_runbook(text: str, path: str = "<text>") -> Runbook:
    if not text.startswith("---\n"):
        raise RunbookError(f"{path}: no front matter (the file must start with '---')")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise RunbookError(f"{path}: the front matter is not closed with '---'")
    try:
        meta = yaml.safe_load(text[4:end])
    except yaml.YAMLError as e:
        raise RunbookError(f"{path}: front matter: {e}") from None
    if not isinstance(meta, dict):
        raise RunbookError(f"{path}: the front matter must be a mapping")
    for name in ("id", "title", "symptoms", "event_kinds", "actions"):
        if name not in meta:
            raise RunbookError(f"{path}: front matter field {name!r} is missing")
    rid = str(meta["id"])
    if slug(rid) != rid:
        raise RunbookError(f"{path}: id {rid!r} must be lower case words joined by dashes")
    kinds = tuple(str(k) for k in meta["event_kinds"])
    for k in kinds:
        if k not in _KINDS:
            raise RunbookError(f"{path}: event_kinds: {k!r} is not an event kind")
    actions = tuple(_template(path, i, a) for i, a in enumerate(meta["actions"] or []))
    if not actions:
        raise RunbookError(f"{path}: actions: at least one is needed")
    sections = _sections(rid, text[end + 5:], path)
    return Runbook(rid, str(meta["title"]), tuple(str(s) for s in meta["symptoms"]), kinds,
                   actions, sections, path)


def _template(path: str, i: int, entry: Any) -> ActionTemplate:
    where = f"{path}: actions[{i}]"
    if not isinstance(entry, dict) or "action" not in entry:
        raise RunbookError(f"{where}: needs an 'action'")
    action = str(entry["action"])
    if action not in ACTIONS:
        raise RunbookError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
    params = entry.get("params") or {}
    expected = set(param_schemas_default()[action]["properties"])
    if set(params) != expected:
        raise RunbookError(f"{where}: {action} takes parameters {sorted(expected)}, "
                           f"got {sorted(params)}")
    for name, value in params.items():
        if not isinstance(value, str) or \
                param_schemas_default()[action]["properties"][name]["type"] == "string":
            continue
        m = _is_expression(value)
        fact = None if m is None else (m["n1"] or m["n2"])
        if fact not in FACT_NAMES:
            raise RunbookError(f"{where}: params.{name}: {value!r} is neither a number nor an "
                               "expression over a fact such as '0.9 * power_limit_w'")
    return ActionTemplate(action, dict(params))


@functools.lru_cache(maxsize=1)
def param_schemas_default() -> dict[str, dict[str, Any]]:
    from ondo.agent.actions import GpuLimits

    return param_schemas(GpuLimits())


def _is_expression(text: str) -> re.Match[str] | None:
    return _EXPR.match(text)


def evaluate(value: Any, facts: dict[str, float], numeric: bool = True) -> Any:
    """A template parameter's value for these facts (literals, and any text where the
    parameter is not a number, pass through); KeyError naming a fact the incident does not
    have."""
    if not isinstance(value, str) or not numeric:
        return value
    m = _is_expression(value)
    if m is None:
        return value
    if m["n1"]:
        return float(m["k1"]) * _fact(facts, m["n1"])
    x = _fact(facts, m["n2"])
    if m["op"] is None:
        return x
    k = float(m["k2"])
    return x * k if m["op"] == "*" else x + k if m["op"] == "+" else x - k


def _fact(facts: dict[str, float], name: str) -> float:
    if name not in facts or facts[name] is None:
        raise KeyError(name)
    return float(facts[name])


def _sections(rid: str, body: str, path: str) -> tuple[Section, ...]:
    out: list[Section] = []
    heading: str | None = None
    lines: list[str] = []
    for line in body.splitlines() + ["## "]:
        if line.startswith("## "):
            if heading is not None:
                text = " ".join(x.strip() for x in lines if x.strip())
                out.append(Section(rid, slug(heading), heading, text))
            heading, lines = line[3:].strip(), []
        elif heading is not None:
            lines.append(line)
    if not out:
        raise RunbookError(f"{path}: no '## ' sections")
    return tuple(out)


@functools.lru_cache(maxsize=4)
def load_runbooks(folder: str | None = None) -> tuple[Runbook, ...]:
    """Every runbook of `folder` (default: the packaged ones), sorted by id; ids unique."""
    root = Path(folder) if folder else RUNBOOK_DIR
    books = [parse_runbook(p.read_text(), str(p)) for p in sorted(root.glob("*.md"))]
    seen: dict[str, str] = {}
    for b in books:
        if b.id in seen:
            raise RunbookError(f"{b.path}: id {b.id!r} is also used by {seen[b.id]}")
        seen[b.id] = b.path
    return tuple(sorted(books, key=lambda b: b.id))


def runbook_by_id(books: tuple[Runbook, ...]) -> dict[str, Runbook]:
    return {b.id: b for b in books}
