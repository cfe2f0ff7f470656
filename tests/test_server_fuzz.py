"""Fuzzing: hypothesis draws request bodies from the app's own OpenAPI schema, with a share
of each value swapped for arbitrary JSON (wrong types, NaN, lone surrogates, huge numbers)
and some bodies that are not JSON at all. Every answer must be below 500 and, when it is an
error, in OpenAI's error shape. The server's context is small (48 tokens) so that the
requests that do generate finish fast."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_harness import MODEL_NAME, make_async_llm, serve, wait_for

EXAMPLES_PER_OPERATION = 130
COUNTS: dict[str, int] = {}

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8)
# Text including lone surrogates and control characters.
TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=24)
SMALL_INTS = st.one_of(st.integers(min_value=-3, max_value=8),
                       st.integers(min_value=-(2**66), max_value=2**66))


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def from_schema(schema: dict[str, Any], components: dict[str, Any], junk: bool,
                name: str = "") -> st.SearchStrategy:
    """Values the schema allows; with `junk`, one in eight is arbitrary JSON instead."""
    valid = _valid(_resolve(schema, components), components, junk, name)
    if not junk:
        return valid
    return st.integers(0, 7).flatmap(lambda k: JSON_VALUES if k == 0 else valid)


def _valid(schema: dict[str, Any], components: dict[str, Any], junk: bool,
           name: str) -> st.SearchStrategy:
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, components, junk, name)
                          for s in schema.get("anyOf", schema.get("oneOf"))])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {k: from_schema(v, components, junk, k) for k, v in props.items()}
        if name == "" and "model" in props:
            fields["model"] = st.sampled_from([MODEL_NAME, MODEL_NAME, "gpt-4", ""])
        if not junk:  # only n=1 is served yet: keep clean bodies clean of the known 400s
            fields.update({k: st.sampled_from([1, None]) for k in ("n", "best_of") if k in props})
        optional = st.fixed_dictionaries({}, optional={k: s for k, s in fields.items()
                                                       if k not in required})
        must = st.fixed_dictionaries({k: s for k, s in fields.items() if k in required})
        return st.tuples(must, optional).map(lambda t: {**t[0], **t[1]})
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, junk, name)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=4)
    if kind == "string":
        return TEXT if junk else st.text(max_size=12)
    if kind == "integer":
        return SMALL_INTS if junk else st.integers(min_value=0, max_value=8)
    if kind == "number":
        return st.one_of(st.floats(min_value=-3, max_value=3), st.floats()) if junk else \
            st.floats(min_value=0, max_value=1)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES  # {} means anything


@pytest.fixture(scope="module")
def fuzz_server():
    llm = make_async_llm(max_model_len=48, num_kv_blocks=64, max_num_seqs=4)
    with serve(llm) as s:
        yield s, llm
    llm.close()


@pytest.fixture(scope="module")
def openapi(fuzz_server):
    server, _ = fuzz_server
    return httpx.get(server.base_url + "/openapi.json").json()


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"internal_error"' not in r.text and '"engine_error"' not in r.text


POST_PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@pytest.mark.parametrize("path", POST_PATHS)
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, openapi, path):
    server, llm = fuzz_server
    components = openapi["components"]["schemas"]
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    raw_bodies = st.one_of(st.binary(max_size=40), TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))
    # A third of the bodies keep to the schema's types, most of the rest carry junk values,
    # one in ten is not JSON at all.
    body_strategy = st.integers(0, 9).flatmap(lambda k: raw_bodies if k == 0 else from_schema(
        schema, components, junk=k > 3).map(
            lambda b: json.dumps(b, allow_nan=True).encode("utf-8", "surrogatepass")))

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  derandomize=True, suppress_health_check=list(HealthCheck))
        @given(body=body_strategy)
        def run(body: bytes) -> None:
            COUNTS[path] = COUNTS.get(path, 0) + 1
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            _check(r)

        run()
    assert wait_for(lambda: llm.num_in_flight == 0, 5.0)
    assert wait_for(lambda: llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"], 5.0)


def test_gets_and_odd_methods_never_get_a_5xx(fuzz_server):
    server, _ = fuzz_server
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                             ("GET", "/tokenize"), ("PUT", "/v1/completions"),
                             ("DELETE", "/v1/models"), ("GET", "/v1/../etc/passwd"),
                             ("POST", "/v1/models")]:
            COUNTS[path] = COUNTS.get(path, 0) + 1
            _check(client.request(method, path))


def test_at_least_500_requests_were_fuzzed():
    assert sum(COUNTS.values()) >= 500, COUNTS

