"""OpenAI tool calling for chat completions.

`tool_choice` decides how a request with `tools` is served:
- `"required"`: constrained decoding into a JSON array of calls, each `{"name": one of the
  tools' names, "parameters": that tool's parameter schema}` (vLLM's form); one call at
  most with `parallel_tool_calls: false`.
- `{"type": "function", "function": {"name": N}}`: constrained decoding into N's parameter
  schema; the output is the call's arguments.
- `"auto"` (the default with tools): the model decides; its text is parsed for calls in
  the chat template's format: Hermes-style `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  (Qwen2.5, Qwen3, and models whose template does not render tools: the tools are then
  described to them in a system message in that format) or Llama 3.1/3.2's JSON
  `{"name": ..., "parameters": ...}` (calls separated by `;`).
- `"none"`: the tools are neither shown to the model nor parsed for.

Calls come back as `tool_calls` (finish_reason "tool_calls"), and streamed as
`delta.tool_calls`: a constrained call's arguments as they are generated, a parsed call
whole once its closing tag (or, for Llama's JSON, the output) is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ondo.engine.structured_outputs import StructuredOutputsParams, check
from ondo.server.errors import bad_request
from ondo.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HERMES, LLAMA3_JSON = "hermes", "llama3_json"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolPlan:
    """How one chat request's tools are served."""

    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict[str, Any]]  # the function definitions, checked
    named: str | None = None  # mode "named": the function to call
    structured: StructuredOutputsParams | None = None  # required / named: the constraint
    parser: str = HERMES
    template_renders_tools: bool = True

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """What the chat template gets as `tools`."""
        if self.mode == "none":
            return None
        return [{"type": "function", "function": t} for t in self.tools]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def plan_tools(body: Any, chat_template: str | None) -> ToolPlan | None:
    """The request's tool plan, or None when it has no tools; a 400 naming the field when
    the tools or tool_choice are wrong."""
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    functions = [_check_tool(i, t) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request("tools have duplicate function names", "tools")
    template = chat_template or ""
    parser = LLAMA3_JSON if ("<|python_tag|>" in template or "ipython" in template) else HERMES
    plan = ToolPlan("auto", functions, parser=parser,
                    template_renders_tools="tools" in template)
    if choice is None or choice == "auto":
        return plan
    if choice == "none":
        plan.mode = "none"
        return plan
    if choice == "required":
        plan.mode = "required"
        items = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "parameters": _parameters(f)},
                  "required": ["name", "parameters"]} for f in functions]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        plan.structured = _constraint(schema, "tools")
        return plan
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the tools "
                              f"({', '.join(names)})", "tool_choice")
        plan.mode, plan.named = "named", name
        function = functions[names.index(name)]
        plan.structured = _constraint(_parameters(function), f"tools[{names.index(name)}].function.parameters")
        return plan
    raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                      '{"type": "function", "function": {"name": ...}}', "tool_choice")


def _check_tool(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad_request("each tool must be {\"type\": \"function\", \"function\": {...}}", where)
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request("a function tool needs a function object", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request("a function's name must be 1-64 letters, digits, '_', '-' or '.'",
                          f"{where}.function.name")
    params = function.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad_request("a function's parameters must be a JSON Schema object",
                          f"{where}.function.parameters")
    if "description" in function and not isinstance(function["description"], str):
        raise bad_request("a function's description must be a string", f"{where}.function.description")
    return function


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _constraint(schema: dict[str, Any], param: str) -> StructuredOutputsParams:
    spec = StructuredOutputsParams(json=schema)
    try:
        check(spec)
    except ValueError as e:
        raise bad_request(str(e), param) from None
    return spec


def hermes_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Qwen2.5's description of tools, for a chat template that does not render them."""
    lines = "\n".join(json.dumps({"type": "function", "function": t}) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


# -- from generated text to calls ----------------------------------------------------------
def _call(name: Any, arguments: Any) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))


def _json_calls(text: str, args_key: str) -> list[ToolCall] | None:
    """Calls written as JSON objects one after another (separated by ';' or whitespace),
    or None if the text is not that."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            return calls or None
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        call = _call(obj.get("name"), obj.get(args_key, obj.get("arguments")))
        if call is None:
            return None
        calls.append(call)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the content outside the calls, the calls) of Hermes-style output."""
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    while True:
        start = text.find(_OPEN, pos)
        if start == -1:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(_CLOSE, start)
        body = text[start + len(_OPEN): end if end != -1 else len(text)]
        parsed = _json_calls(body.strip(), "arguments")
        if parsed is None:  # not a call after all: keep it as text
            content.append(text[start: end + len(_CLOSE) if end != -1 else len(text)])
        else:
            calls += parsed
        if end == -1:
            break
        pos = end + len(_CLOSE)
    if not calls:  # a plain answer stays exactly as generated (as its stream does)
        return (text or None), []
    rest = "".join(content).strip()
    return (rest or None), calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    stripped = text.strip()
    if stripped.startswith("<|python_tag|>"):
        stripped = stripped[len("<|python_tag|>"):].strip()
    if stripped.startswith("{"):
        calls = _json_calls(stripped, "parameters")
        if calls:
            return None, calls
    return (text or None), []


def parse_constrained(plan: ToolPlan, text: str) -> list[ToolCall] | None:
    """The calls of a `required` or `named` output; None when it does not parse (cut short)."""
    if plan.mode == "named":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [ToolCall(id=new_call_id(), function=FunctionCall(name=plan.named, arguments=text))]
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = [_call(item.get("name"), item.get("parameters")) for item in items if isinstance(item, dict)]
    return [c for c in calls if c is not None] or None


def parse_output(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output under the plan."""
    if plan.mode in ("required", "named"):
        calls = parse_constrained(plan, text)
        return (None, calls) if calls else (text, [])
    if plan.mode == "none":
        return text, []
    return parse_llama3_json(text) if plan.parser == LLAMA3_JSON else parse_hermes(text)


# -- streaming ------------------------------------------------------------------------------
@dataclass
class ToolStream:
    """One choice's streamed text turned into content deltas and tool-call deltas."""

    plan: ToolPlan
    buffer: str = ""
    num_calls: int = 0
    in_call: bool = False
    json_mode: bool | None = None  # llama3_json: does the output start with '{'?
    array_pos: int = -1  # required: where the next call in the array starts
    named_started: bool = False
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """(content to send, tool-call deltas to send) for the new text."""
        mode = self.plan.mode
        if mode == "none":
            return text, []
        if mode == "named":
            return "", self._named(text)
        self.buffer += text
        if mode == "required":
            return "", self._required(finished)
        if self.plan.parser == LLAMA3_JSON:
            return self._llama(finished)
        return self._hermes(finished)

    def _delta(self, call: ToolCall) -> DeltaToolCall:
        self.calls.append(call)
        self.num_calls += 1
        return DeltaToolCall(index=self.num_calls - 1, id=call.id, type="function",
                             function=DeltaFunctionCall(name=call.function.name,
                                                        arguments=call.function.arguments))

    def _named(self, text: str) -> list[DeltaToolCall]:
        self.buffer += text
        if not self.named_started:
            self.named_started = True
            call = ToolCall(id=new_call_id(), function=FunctionCall(name=self.plan.named, arguments=""))
            self.calls.append(call)
            self.num_calls = 1
            return [DeltaToolCall(index=0, id=call.id, type="function",
                                  function=DeltaFunctionCall(name=self.plan.named, arguments=text))]
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else []

    def _required(self, finished: bool) -> list[DeltaToolCall]:
        out = []
        decoder = json.JSONDecoder()
        if self.array_pos < 0:
            start = self.buffer.find("[")
            if start == -1:
                return []
            self.array_pos = start + 1
        while True:
            pos = self.array_pos
            while pos < len(self.buffer) and self.buffer[pos] in " \t\r\n,":
                pos += 1
            try:
                item, end = decoder.raw_decode(self.buffer, pos)
            except json.JSONDecodeError:
                return out
            self.array_pos = end
            if isinstance(item, dict):
                call = _call(item.get("name"), item.get("parameters"))
                if call is not None:
                    out.append(self._delta(call))

    def _hermes(self, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        content, deltas = "", []
        while True:
            if not self.in_call:
                start = self.buffer.find(_OPEN)
                if start == -1:
                    keep = 0 if finished else _partial_suffix(self.buffer, _OPEN)
                    cut = len(self.buffer) - keep
                    content += self.buffer[:cut]
                    self.buffer = self.buffer[cut:]
                    return content, deltas
                content += self.buffer[:start]
                self.buffer = self.buffer[start:]
                self.in_call = True
            end = self.buffer.find(_CLOSE)
            if end == -1 and not finished:
                return content, deltas
            block = self.buffer[: end + len(_CLOSE)] if end != -1 else self.buffer
            self.buffer = self.buffer[len(block):]
            self.in_call = False
            parsed = _json_calls(block[len(_OPEN):].replace(_CLOSE, "").strip(), "arguments")
            if parsed is None:
                content += block
            else:
                deltas += [self._delta(c) for c in parsed]
            if end == -1:
                return content, deltas

    def _llama(self, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        if self.json_mode is None:
            stripped = self.buffer.lstrip()
            if not stripped and not finished:
                return "", []
            self.json_mode = stripped.startswith("{") or stripped.startswith("<|python_tag|>")
        if not self.json_mode:
            text, self.buffer = self.buffer, ""
            return text, []
        if not finished:
            return "", []
        content, calls = parse_llama3_json(self.buffer)
        self.buffer = ""
        return (content or ""), [self._delta(c) for c in calls]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
