"""What a request's output must match (a JSON schema, any JSON object, a regex, one of a list
of strings, or a Lark grammar), and that constraint as a grammar for the grammar library.

`StructuredOutputsParams` is plain data (it crosses the engine process's pipe inside
`SamplingParams`); `grammar_text` turns it into llguidance's grammar and `check` validates
it the way the engine will use it, raising a ValueError that names what is wrong
(an invalid schema, a keyword the library does not implement, a regex that does not
compile). Nothing here needs a tokenizer: matching against a vocabulary is `grammar.py`'s.

JSON is generated compactly, with the separators `", "` and `": "` and no free whitespace
unless `whitespace_pattern` allows some: a small model given free whitespace can pad its
output with newlines until `max_tokens` and never close the object. An object schema
that lists `properties` and says nothing of other properties gets no others (as xgrammar's
strict mode, vLLM's default, does): the output still validates against the schema, and a
model cannot wander off into invented keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputsParams:
    """Exactly one of the fields: the output must be JSON matching `json` (a JSON Schema as a
    dict or its JSON text), any JSON object (`json_object=True`), a full match of `regex`,
    exactly one of `choice`, or a sentence of `grammar` (Lark syntax, llguidance's dialect)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None  # JSON only: the whitespace allowed between tokens

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("invalid structured outputs: give exactly one of "
                             f"{', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("invalid structured outputs: json must be a JSON Schema object "
                             "or its JSON text")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid structured outputs: json is not valid JSON: {e}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("invalid structured outputs: json must be a JSON Schema object")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("invalid structured outputs: regex must be a non-empty string")
        if self.choice is not None and (
                not isinstance(self.choice, list) or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("invalid structured outputs: choice must be a non-empty list of "
                             "non-empty strings")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("invalid structured outputs: grammar must be a non-empty string")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError("invalid structured outputs: whitespace_pattern must be a string")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """The cache key of its compiled grammar: a hash of the constraint's canonical form."""
        value: Any = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = json.loads(value)
        canonical = json.dumps([self.kind, value, self.whitespace_pattern], sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for the constraint (not yet checked: see `check`)."""
    from llguidance import LLMatcher

    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json if kind == "json" else {"type": "object"}
        options = dict(_JSON_OPTIONS)
        if spec.whitespace_pattern is not None:
            options = {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}
        if isinstance(schema, str):
            schema = json.loads(schema)
        return LLMatcher.grammar_from_json_schema(json.dumps(no_extra_properties(schema)),
                                                  overrides=options)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        # Lark string literals take JSON's escapes, so any string is one literal.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return LLMatcher.grammar_from_lark(spec.grammar)


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "additionalProperties", "additionalItems", "unevaluatedItems", "contains",
               "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")  # not allOf: its parts combine


def no_extra_properties(schema: Any) -> Any:
    """A copy where each object schema with `properties` and no word on other properties
    (`additionalProperties`, `patternProperties`, `unevaluatedProperties`) allows none."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if isinstance(node.get("properties"), dict) and not any(
                k in node for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
            node["additionalProperties"] = False
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                for sub in node[key].values():
                    walk(sub)
        for key in _SUBSCHEMAS:
            walk(node.get(key))
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                for sub in node[key]:
                    walk(sub)

    walk(schema)
    return schema


def check(spec: StructuredOutputsParams) -> str:
    """The grammar, validated; raises ValueError naming the problem (fast: no vocabulary)."""
    from llguidance import LLMatcher

    what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex",
            "choice": "choice", "grammar": "grammar"}[spec.kind]
    try:
        text = grammar_text(spec)
        error = LLMatcher.validate_grammar(text)
    except Exception as e:  # the library's own kinds, on input it cannot even read
        raise ValueError(f"invalid {what}: {e}") from None
    if error:
        raise ValueError(f"invalid {what}: {_first_lines(error)}")
    return text


def _first_lines(message: str, limit: int = 400) -> str:
    """The library's message without its grammar dump: what a client can act on."""
    lines = [ln.rstrip() for ln in message.strip().splitlines() if ln.strip()]
    text = " ".join(lines[:4])
    return text if len(text) <= limit else text[: limit - 3] + "..."
