"""A request's structured-output fields as one `StructuredOutputsParams`, or a 400 naming the
field: OpenAI's `response_format` (`json_schema`, `json_object`, `text`), vLLM's extras
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`.
At most one of them may constrain a request; the constraint is checked (schema, regex,
grammar) before the request reaches the engine."""

from __future__ import annotations

from typing import Any

from ondo.engine.structured_outputs import StructuredOutputsParams, check
from ondo.server.errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
BACKENDS = (None, "", "auto", "guidance", "llguidance")


def structured_outputs(request: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint, the field it came from), or (None, None) when there is none."""
    given: list[tuple[str, StructuredOutputsParams]] = []
    whitespace = getattr(request, "guided_whitespace_pattern", None)
    fmt = getattr(request, "response_format", None)
    if fmt is not None:
        spec = _from_response_format(fmt, whitespace)
        if spec is not None:
            given.append(("response_format", spec))
    for field, kind in _GUIDED.items():
        value = getattr(request, field, None)
        if value is not None:
            given.append((field, _make(field, {kind: value, "whitespace_pattern": whitespace})))
    extra = getattr(request, "structured_outputs", None)
    if extra is not None:
        if not isinstance(extra, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        fields = {k: v for k, v in extra.items() if k in StructuredOutputsParams.__dataclass_fields__}
        unknown = sorted(set(extra) - set(fields) - {"backend", "disable_any_whitespace"})
        if unknown:
            raise bad_request(f"structured_outputs has unknown field(s) {unknown}", "structured_outputs")
        given.append(("structured_outputs", _make("structured_outputs", fields)))
    backend = getattr(request, "guided_decoding_backend", None)
    if backend not in BACKENDS:
        raise bad_request(f"guided_decoding_backend {backend!r} is not available: this server "
                          "uses llguidance ('guidance' or 'auto')", "guided_decoding_backend")
    if len(given) > 1:
        names = [name for name, _ in given]
        raise bad_request(f"give one structured-output constraint, not several: {' and '.join(names)}",
                          names[1])
    if not given:
        return None, None
    field, spec = given[0]
    try:
        check(spec)
    except ValueError as e:
        raise bad_request(str(e), field) from None
    return spec, field


def _from_response_format(fmt: Any, whitespace: str | None) -> StructuredOutputsParams | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _make("response_format", {"json_object": True, "whitespace_pattern": whitespace})
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema",
                              "response_format.json_schema")
        return _make("response_format.json_schema",
                     {"json": fmt.json_schema.schema_, "whitespace_pattern": whitespace})
    raise bad_request(f"response_format type {fmt.type!r} is not supported: use text, json_object "
                      "or json_schema", "response_format.type")


def _make(field: str, fields: dict[str, Any]) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError) as e:
        raise bad_request(f"{field}: {e}", field) from None
