"""What a chat request asks the reply to be, compiled into one grammar for the worker.

The grammar is llguidance's Lark text with the JSON Schemas embedded (`%json {...}`); it travels in
`SamplingParams.grammar` and both engines run it (the built-in one with llguidance, vLLM with its
structured outputs). It constrains only the reply: the rendered conversation, and so the cached
prefix, is the same with or without it.

- tool_choice "required" / a named function: the reply is the call markup the chat template and
  gateway/tool_calls.py use, holding one call (several with parallel_tool_calls) of a listed
  function whose arguments validate against that function's JSON Schema.
- tool_choice "auto": plain text, or text followed by well-formed calls (never broken markup).
- response_format json_object: a JSON object; json_schema: JSON valid against the schema.
- tool_choice "none" and response_format text: no grammar.

Schemas are checked twice before any token is generated: as JSON Schema (jsonschema's
check_schema) and as a grammar (llguidance's compiler, which names a feature it does not support).
A `strict` schema must be enforceable whole; a non-strict one is enforced as far as llguidance can
(its `lenient` mode ignores the rest), since OpenAI promises those only best effort.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jsonschema
import llguidance

from gateway.chat_template import ToolPolicy
from gateway.errors import InvalidRequest, Unsupported
from gateway.openai_schema import Tool

# One spelling of JSON, the one the tool prompt and the chat template show: no free whitespace, which
# a small model would otherwise fill with newlines until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Markup of the two call forms (gateway/tool_calls.py): (open, separator between calls, close).
LIST_FORM = ("<tool_call>[", ", ", "]</tool_call>")
HERMES_FORM = ("<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>")
# Text that contains no call tag; "text, then the tag that opens a call" (the tag only once, at its end).
TEXT_RULE = "TEXT: /(?s:.+)/ & ~/(?s:.*<tool_call>.*)/"
# Base URI of a tool's parameters inside the call schema (a client's own `$id` wins).
ARGUMENTS_ID = "urn:agentkv:tool-arguments"


def check_json_schema(schema: Any, where: str) -> None:
    """A 400 naming `where` unless `schema` is a valid JSON Schema (of the draft it declares)."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{where} must be a JSON Schema object", param=where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise InvalidRequest(f"{where} is not a valid JSON Schema: {exc.message}{' at ' + path if path else ''}",
                             param=where) from None  # fmt: skip


def _json(schema: Any, strict: bool = True) -> str:
    """`%json` of a schema, in JSON_STYLE (a boolean schema is wrapped: true = any JSON). Not `strict`:
    keywords and formats llguidance cannot enforce (`uniqueItems`, `not`, `format: password`, ...) are
    ignored instead of refused, which is what OpenAI promises a non-strict schema: best effort."""
    if schema is True or schema == {}:
        schema = {"type": ["object", "array", "string", "number", "integer", "boolean", "null"]}
    style = JSON_STYLE if strict else {**JSON_STYLE, "lenient": True}
    return "%json " + json.dumps({**schema, "x-guidance": style}, ensure_ascii=False)


@functools.lru_cache(maxsize=512)
def _compile_error(grammar: str) -> str:
    return llguidance.LLMatcher.validate_grammar(grammar)


def _check_compiles(grammar: str, where: str) -> None:
    error = _compile_error(grammar)
    if error:
        reason = error.split("failed to compile JSON schema: ", 1)[-1].split("\n   1 |", 1)[0].strip()
        raise Unsupported(f"{where} uses a JSON Schema feature agentkv cannot enforce: {reason}", param=where)


# -- tool calls ---------------------------------------------------------------------------------
def _call_json(tool: Tool) -> str:
    """`%json` of one call object: {"name": <this function>, "arguments": <its parameters>}, enforced
    whole for a `strict` tool, best effort otherwise.

    The parameters keep their own base URI (`$id`), so their `$ref`s ("#/$defs/Point", which pydantic
    writes for every nested model, or "#" for a recursive one) resolve inside them, not in this wrapper."""
    params = tool.function.parameters
    arguments = {"$id": ARGUMENTS_ID, **params} if params else {"type": "object", "properties": {}, "additionalProperties": False}
    schema = {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return _json(schema, strict=tool.function.strict is True)


def check_tools(tools: list[Tool] | None, compile: bool = True) -> None:
    """Each tool's parameters: a valid JSON Schema (else a 400), and when the reply is constrained
    (`compile`) one whose features the grammar can enforce, all of them for a `strict` tool."""
    for n, tool in enumerate(tools or []):
        where = f"tools[{n}].function.parameters"
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, where)
            kind = tool.function.parameters.get("type", "object")
            if kind != "object":  # a call's arguments are a JSON object: `1` would be forced, and no call could carry it
                raise InvalidRequest(f"{where} must be the JSON Schema of an object (type: \"object\"), got type: "
                                     f"{json.dumps(kind)}", param=where)  # fmt: skip
        if compile:
            _check_compiles(f"start: {_call_json(tool)}", where)


def _call_rules(tools: list[Tool], policy: ToolPolicy) -> list[str]:
    chosen = [t for t in tools if t.function.name in policy.names]
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(chosen)))}"]
    return rules + [f"call_{i}: {_call_json(t)}" for i, t in enumerate(chosen)]


def _calls(policy: ToolPolicy, hermes: bool, opened: bool = False) -> str:
    """The call markup as a Lark sequence (`opened`: without the opening tag, which PRE matched)."""
    opener, separator, closer = HERMES_FORM if hermes else LIST_FORM
    repeat = f" ({json.dumps(separator)} call)*" if policy.parallel else ""
    return ("" if opened else json.dumps(opener) + " ") + f"call{repeat} {json.dumps(closer)}"


def tool_grammar(tools: list[Tool], policy: ToolPolicy, hermes: bool) -> str | None:
    """The reply's grammar for a request with tools (None: tool_choice "none", nothing to enforce)."""
    if not policy.parse:
        return None
    if policy.required:
        start = f"start: {_calls(policy, hermes)}"
    else:  # text, or text and then calls: the tag can only open a well-formed call
        opener = (HERMES_FORM if hermes else LIST_FORM)[0]
        pre = f"PRE: /(?s:.*){_regex_literal(opener)}/ & ~/(?s:.*<tool_call>.*<tool_call>.*)/"
        start = f"start: TEXT | PRE {_calls(policy, hermes, opened=True)}\n{TEXT_RULE}\n{pre}"
    return "\n".join([start, *_call_rules(tools, policy)]) + "\n"


def _regex_literal(text: str) -> str:
    return "".join("\\n" if c == "\n" else "\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


# -- response_format ------------------------------------------------------------------------------
def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar of `response_format` (None for text); a 400 for an unknown type or a bad schema."""
    if not response_format:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format must be an object with a `type`", param="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return f"start: {_json({'type': 'object'})}\n"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise InvalidRequest("response_format json_schema needs `json_schema.schema`", param="response_format")
        schema = spec["schema"]
        check_json_schema(schema, "response_format.json_schema.schema")
        if schema is False:  # valid JSON Schema, but no reply can match it
            raise InvalidRequest("response_format.json_schema.schema is `false`: it accepts no reply", param="response_format")
        grammar = f"start: {_json(schema, spec.get('strict') is True)}\n"
        _check_compiles(grammar, "response_format.json_schema.schema")
        return grammar
    raise InvalidRequest(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                         param="response_format")  # fmt: skip


def reply_grammar(tools: list[Tool] | None, policy: ToolPolicy, response_format: Mapping[str, Any] | None,
                  hermes: bool) -> str | None:  # fmt: skip
    """The one grammar of a chat reply. Forced calls win over response_format (the reply is calls);
    with tool_choice "auto" and a JSON response_format, the reply is that JSON or calls. With
    tool_choice "none" the tools are only shown to the model, so their schemas need not compile."""
    check_tools(tools, compile=policy.parse)
    json_grammar = response_format_grammar(response_format)
    calls = tool_grammar(tools, policy, hermes) if tools else None
    if calls is None or policy.required:
        return calls or json_grammar
    if json_grammar is None:
        return calls
    json_rule = json_grammar.removeprefix("start: ").strip()
    return "\n".join([f"start: reply_json | {_calls(policy, hermes)}", f"reply_json: {json_rule}",
                      *_call_rules(tools, policy)]) + "\n"  # fmt: skip
