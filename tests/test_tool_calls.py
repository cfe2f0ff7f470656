"""Tool calling without a model: which plan a request's tools and tool_choice give, the
parsers for Hermes-style and Llama 3 JSON calls, and streamed deltas that add up to the
parse of the whole text however the text is split."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest

from ondo.engine.structured_outputs import grammar_text
from ondo.server.errors import APIError
from ondo.server.tool_calls import (
    HERMES,
    LLAMA3_JSON,
    ToolStream,
    parse_hermes,
    parse_llama3_json,
    parse_output,
    plan_tools,
)

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
QWEN_TEMPLATE = "{% if tools %}<tools>{{ tools }}</tools>{% endif %} ... <tool_call> ..."
LLAMA_TEMPLATE = "{% if tools %}...{% endif %}<|python_tag|> ipython"


def body(tools=TOOLS, tool_choice=None, parallel_tool_calls=True):
    return SimpleNamespace(tools=tools, tool_choice=tool_choice,
                           parallel_tool_calls=parallel_tool_calls)


def test_the_chat_template_picks_the_parser():
    assert plan_tools(body(), QWEN_TEMPLATE).parser == HERMES
    assert plan_tools(body(), LLAMA_TEMPLATE).parser == LLAMA3_JSON
    plain = plan_tools(body(), "{{ messages }}")
    assert plain.parser == HERMES and not plain.template_renders_tools
    assert plan_tools(body(), QWEN_TEMPLATE).template_renders_tools


def test_required_constrains_to_an_array_of_calls_of_the_given_tools():
    plan = plan_tools(body(tool_choice="required", parallel_tool_calls=False), QWEN_TEMPLATE)
    schema = plan.structured.json
    assert plan.mode == "required" and schema["minItems"] == 1 and schema["maxItems"] == 1
    good = [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "launch_rocket", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"town": 1}}], schema)
    assert grammar_text(plan.structured)  # llguidance takes it


def test_a_named_function_constrains_to_its_parameters():
    plan = plan_tools(body(tool_choice={"type": "function", "function": {"name": "get_time"}}), None)
    assert plan.mode == "named" and plan.named == "get_time"
    assert plan.structured.json == TIME["parameters"]
    content, calls = parse_output(plan, '{"tz": "UTC"}')
    assert content is None and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"tz": "UTC"}
    # Cut short by max_tokens: not a call, the text comes back as content.
    assert parse_output(plan, '{"tz": "U') == ('{"tz": "U', [])


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools[0].function.parameters"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
])
def test_bad_tools_and_choices_name_the_field(kwargs, param):
    with pytest.raises(APIError) as e:
        plan_tools(body(**kwargs), QWEN_TEMPLATE)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_hermes_calls_and_the_content_around_them():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"tz": "CET"}
    assert len({c.id for c in calls}) == 2
    # An unclosed last call (the model stopped at EOS) still counts; junk stays text.
    assert parse_hermes('<tool_call>{"name": "get_time", "arguments": {}}')[1][0].function.name == "get_time"
    assert parse_hermes("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse_hermes("no calls here") == ("no calls here", [])


def test_llama3_json_calls():
    content, calls = parse_llama3_json('{"name": "get_weather", "parameters": {"city": "Rome"}}; '
                                       '{"name": "get_time", "parameters": {}}')
    assert content is None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert parse_llama3_json("The weather is fine.") == ("The weather is fine.", [])
    assert parse_llama3_json('{"not": "a call"}') == ('{"not": "a call"}', [])


def stream(plan, text: str, cut: int) -> tuple[str, list]:
    s = ToolStream(plan)
    content, deltas = "", []
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)] or [""]
    for i, piece in enumerate(pieces):
        c, d = s.feed(piece, i == len(pieces) - 1)
        content += c
        deltas += d
    return content, deltas


def merged(deltas) -> list[tuple[str, str]]:
    """(name, arguments) per call index, from the deltas."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, ["", ""])
        if d.function.name:
            entry[0] = d.function.name
        entry[1] += d.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 1000])
@pytest.mark.parametrize(("template", "choice", "text"), [
    (QWEN_TEMPLATE, None, 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                          '</tool_call> and <tool_cal'),
    (QWEN_TEMPLATE, None, "A plain answer with a < sign and <tool no call."),
    (LLAMA_TEMPLATE, None, '{"name": "get_time", "parameters": {"tz": "UTC"}}'),
    (LLAMA_TEMPLATE, None, "Just words."),
    (None, "required", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                       '{"name": "get_time", "parameters": {}}]'),
    (None, {"type": "function", "function": {"name": "get_weather"}}, '{"city": "Lima"}'),
])
def test_streamed_deltas_add_up_to_the_whole_parse(template, choice, text, cut):
    plan = plan_tools(body(tool_choice=choice), template)
    content, deltas = stream(plan, text, cut)
    whole_content, whole_calls = parse_output(plan, text)
    assert content == (whole_content or "") if plan.mode == "auto" else content == ""
    assert merged(deltas) == [(c.function.name, c.function.arguments) for c in whole_calls]
    assert all(d.id for d in deltas if d.function.name)  # each call's first delta has its id
