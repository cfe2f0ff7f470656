"""Fifty requests over ten JSON schemas (nested objects, enums, arrays with bounds, numbers
with ranges, optional fields, $ref, anyOf), generated in one batch by the embedded model:
every output must parse and validate against its schema with `jsonschema`."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ondo import LLM, SamplingParams, StructuredOutputsParams

SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "email": {"type": "string", "maxLength": 40}},
        "required": ["name", "age"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "status": {"type": "string", "enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 12},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 10}},
                "required": ["sku", "quantity"]}},
        },
        "required": ["id", "status", "items"],
    },
    "weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
                       "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow"]},
                       "humidity": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["city", "temperature_c", "conditions"],
    },
    "gpu_alert": {
        "type": "object",
        "properties": {
            "gpu": {"type": "integer", "minimum": 0, "maximum": 7},
            "severity": {"type": "string", "enum": ["info", "warning", "critical"]},
            "metrics": {"type": "object",
                        "properties": {"temp_c": {"type": "number", "minimum": 20, "maximum": 110},
                                       "power_w": {"type": "number", "minimum": 0, "maximum": 1000}},
                        "required": ["temp_c"]},
        },
        "required": ["gpu", "severity", "metrics"],
    },
    "tags": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
    },
    "boolean_flags": {
        "type": "object",
        "properties": {"enabled": {"type": "boolean"}, "retries": {"type": "integer", "minimum": 0,
                                                                   "maximum": 5},
                       "mode": {"type": "string", "enum": ["fast", "safe"]}},
        "required": ["enabled", "mode"],
    },
    "tree": {
        "$defs": {"leaf": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 10},
                                                           "weight": {"type": "integer", "minimum": 1,
                                                                      "maximum": 9}},
                           "required": ["label", "weight"]}},
        "type": "object",
        "properties": {"root": {"type": "string", "maxLength": 10},
                       "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 3}},
        "required": ["root", "children"],
    },
    "shape": {
        "anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"},
                                              "radius": {"type": "number", "minimum": 0, "maximum": 100}},
             "required": ["kind", "radius"]},
            {"type": "object", "properties": {"kind": {"const": "square"},
                                              "side": {"type": "integer", "minimum": 1, "maximum": 100}},
             "required": ["kind", "side"]},
        ],
    },
    "matrix": {
        "type": "array", "minItems": 2, "maxItems": 3,
        "items": {"type": "array", "minItems": 2, "maxItems": 2,
                  "items": {"type": "integer", "minimum": -9, "maximum": 9}},
    },
    "event": {
        "type": "object",
        "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 30},
                       "day": {"type": "string", "pattern": "^2025-(0[1-9]|1[0-2])-[0-2][0-9]$"},
                       "attendees": {"type": "integer", "minimum": 1, "maximum": 500},
                       "online": {"type": "boolean"}},
        "required": ["title", "day"],
    },
}
ASKS = ["Give one example as JSON.", "Invent a realistic record, JSON only.",
        "Answer with a JSON value.", "Produce sample data.", "Output the data now."]


@pytest.mark.slow
def test_fifty_requests_over_ten_schemas_all_validate():
    llm = LLM(max_model_len=512, max_num_seqs=64)
    requests = [(name, ask) for name in SCHEMAS for ask in ASKS]
    assert len(requests) == 50
    conversations = [[{"role": "user", "content": f"{ask} Subject: {name.replace('_', ' ')}."}]
                     for name, ask in requests]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=200,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[name]))
              for i, (name, _) in enumerate(requests)]
    outs = llm.chat(conversations, params)
    for (name, _), out in zip(requests, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (name, c.text)
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])
    stats = llm.stats()
    assert stats["num_grammars_compiled"] == len(SCHEMAS)  # one per schema: the rest hit the cache
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
