"""gateway/grammar.py: what a chat request asks for -> one llguidance grammar, checked before any token.

Each grammar is run here against the real SmolLM2 tokenizer with llguidance's matcher: the texts
the reply may be are accepted, broken or foreign ones rejected.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from gateway_fakes import tokenizer  # noqa: F401  (fixture)

from gateway.chat_template import ChatRenderer, ToolPolicy
from gateway.errors import InvalidRequest, Unsupported
from gateway.grammar import check_tools, reply_grammar, response_format_grammar
from gateway.openai_schema import FunctionDefinition, NamedFunction, NamedToolChoice, Tool

WEATHER = Tool(function=FunctionDefinition(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"], "additionalProperties": False}))  # fmt: skip
CLOCK = Tool(function=FunctionDefinition(name="get_time", parameters=None))
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smol(tokenizer):
    return ChatRenderer(tokenizer)


@pytest.fixture(scope="module")
def matches(tokenizer):
    lltok = llguidance.hf.from_tokenizer(tokenizer)

    def run(grammar: str, text: str, complete: bool = True) -> bool:
        """Whether `text` is (`complete`: a whole) reply the grammar allows."""
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        ok = all(m.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and (m.is_accepting() if complete else True)

    return run


def call(name: str, args: dict) -> str:
    return json.dumps({"name": name, "arguments": args})


def test_required_means_one_or_more_calls_of_a_listed_tool_with_valid_arguments(smol, matches):
    g = reply_grammar([WEATHER, CLOCK], smol.tool_policy([WEATHER, CLOCK], "required", None), None, hermes=False)
    assert matches(g, f'<tool_call>[{call("get_weather", {"city": "Oslo"})}]</tool_call>')
    assert matches(g, f'<tool_call>[{call("get_weather", {"city": "Oslo", "days": 2})}, {call("get_time", {})}]</tool_call>')
    assert not matches(g, "Sure, here you go")  # text is not a call
    assert not matches(g, f'<tool_call>[{call("get_stock_price", {"symbol": "AAPL"})}]</tool_call>')  # not listed
    assert not matches(g, f'<tool_call>[{call("get_weather", {"symbol": "TN"})}]</tool_call>')  # not its schema
    assert not matches(g, f'<tool_call>[{call("get_weather", {"days": 2})}]</tool_call>')  # misses a required field


def test_a_named_function_allows_only_one_call_of_it(smol, matches):
    named = NamedToolChoice(function=NamedFunction(name="get_time"))
    g = reply_grammar([WEATHER, CLOCK], smol.tool_policy([WEATHER, CLOCK], named, None), None, hermes=False)
    assert matches(g, f'<tool_call>[{call("get_time", {})}]</tool_call>')
    assert not matches(g, f'<tool_call>[{call("get_weather", {"city": "Oslo"})}]</tool_call>')
    assert not matches(g, f'<tool_call>[{call("get_time", {})}, {call("get_time", {})}]</tool_call>')


def test_auto_allows_text_or_text_then_well_formed_calls_never_broken_markup(smol, matches):
    g = reply_grammar([WEATHER], smol.tool_policy([WEATHER], "auto", None), None, hermes=False)
    assert matches(g, "It is sunny in Oslo today.")
    assert matches(g, f'Let me check.\n<tool_call>[{call("get_weather", {"city": "Oslo"})}]</tool_call>')
    assert not matches(g, '<tool_call>[{"name": "get_weather", "arguments": {"town": 1}}]</tool_call>')
    assert not matches(g, "<tool_call>Oslo</tool_call>")
    assert reply_grammar([WEATHER], smol.tool_policy([WEATHER], "none", None), None, hermes=False) is None


def test_the_hermes_form_is_one_block_per_call(matches):
    policy = ToolPolicy(parse=True, required=True, names=frozenset(["get_weather", "get_time"]))
    g = reply_grammar([WEATHER, CLOCK], policy, None, hermes=True)
    one = f'<tool_call>\n{call("get_weather", {"city": "Oslo"})}\n</tool_call>'
    assert matches(g, one)
    assert matches(g, one + f'\n<tool_call>\n{call("get_time", {})}\n</tool_call>')
    assert not matches(g, f'<tool_call>[{call("get_weather", {"city": "Oslo"})}]</tool_call>')


def test_response_format_json_object_and_json_schema(matches):
    obj = response_format_grammar({"type": "json_object"})
    assert matches(obj, '{"a": [1, 2]}') and not matches(obj, "[1, 2]") and not matches(obj, "Sure! {")
    strict = response_format_grammar({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}})
    assert matches(strict, '{"answer": 42}')
    assert not matches(strict, '{"answer": "42"}') and not matches(strict, '{"answer": 4, "extra": 1}')
    assert response_format_grammar({"type": "text"}) is None and response_format_grammar(None) is None


def test_auto_with_a_json_response_format_is_that_json_or_calls(smol, matches):
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    g = reply_grammar([WEATHER], smol.tool_policy([WEATHER], "auto", None), rf, hermes=False)
    assert matches(g, '{"answer": 1}')
    assert matches(g, f'<tool_call>[{call("get_weather", {"city": "Oslo"})}]</tool_call>')
    assert not matches(g, "plain text")


@pytest.mark.parametrize(
    ("response_format", "error", "match"),
    [
        ({"type": "xml"}, InvalidRequest, "not one of text, json_object, json_schema"),
        ({"type": "json_schema"}, InvalidRequest, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}, InvalidRequest, "not a valid JSON Schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "if": {}, "then": {}}, "strict": True}}, Unsupported,
         r'"if", "then"'),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(?=a)b"}}}, Unsupported, "look-around"),
    ],
)
def test_bad_or_unsupported_response_formats_are_clear_400s(response_format, error, match):
    with pytest.raises(error, match=match) as err:
        response_format_grammar(response_format)
    assert err.value.param == "response_format" or err.value.param.startswith("response_format")


def test_tool_parameters_must_be_a_valid_and_enforceable_json_schema():
    check_tools([WEATHER, CLOCK])
    bad = Tool(function=FunctionDefinition(name="f", parameters={"type": "object", "properties": {"a": {"type": 5}}}))
    with pytest.raises(InvalidRequest, match=r"tools\[1\].function.parameters is not a valid JSON Schema"):
        check_tools([WEATHER, bad])
    unsupported = Tool(function=FunctionDefinition(name="f", parameters={"type": "object", "not": {"required": ["a"]}}, strict=True))
    with pytest.raises(Unsupported, match=r'tools\[0\].*"not"'):
        check_tools([unsupported])


# What pydantic writes for a set[str] and a SecretStr: nothing a grammar can enforce whole.
TAGS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                                         "token": {"type": "string", "format": "password"}},
        "required": ["tags"], "additionalProperties": False}  # fmt: skip


def test_a_non_strict_schema_is_enforced_as_far_as_the_grammar_can(smol, matches):
    """OpenAI promises a non-strict schema best effort: what llguidance cannot enforce is ignored, the rest
    holds; `strict: true` asks for all of it, so there it is a 400."""
    loose = Tool(function=FunctionDefinition(name="tag", parameters=TAGS))
    g = reply_grammar([loose], smol.tool_policy([loose], "required", None), None, hermes=False)
    assert matches(g, f'<tool_call>[{call("tag", {"tags": ["a", "b"], "token": "x"})}]</tool_call>')
    assert not matches(g, f'<tool_call>[{call("tag", {"tags": "a"})}]</tool_call>')  # types still hold
    with pytest.raises(Unsupported, match="uniqueItems"):
        check_tools([Tool(function=FunctionDefinition(name="tag", parameters=TAGS, strict=True))])
    rf = response_format_grammar({"type": "json_schema", "json_schema": {"name": "t", "schema": TAGS}})
    assert matches(rf, '{"tags": ["a"]}') and not matches(rf, '{"tags": 1}')
    with pytest.raises(Unsupported, match="uniqueItems"):
        response_format_grammar({"type": "json_schema", "json_schema": {"name": "t", "schema": TAGS, "strict": True}})


# What pydantic writes for a nested model (openai-agents' function_tool, the openai SDK's
# pydantic_function_tool, agentkv's own @tool): its $refs point into the parameters' own $defs.
DISTANCE = Tool(function=FunctionDefinition(name="distance", parameters={
    "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "type": "object", "properties": {"a": {"$ref": "#/$defs/Point"}, "b": {"$ref": "#/$defs/Point"}},
    "required": ["a", "b"], "additionalProperties": False}))  # fmt: skip
TREE = Tool(function=FunctionDefinition(name="plant", parameters={
    "type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["v", "kids"], "additionalProperties": False}))  # fmt: skip


def test_references_inside_tool_parameters_resolve_in_the_parameters(smol, matches):
    check_tools([DISTANCE, TREE])
    g = reply_grammar([DISTANCE], smol.tool_policy([DISTANCE], "required", None), None, hermes=False)
    assert matches(g, f'<tool_call>[{call("distance", {"a": {"x": 0, "y": 1}, "b": {"x": 2, "y": 3}})}]</tool_call>')
    assert not matches(g, f'<tool_call>[{call("distance", {"a": {"x": 0}, "b": {"x": 2, "y": 3}})}]</tool_call>')
    # "#" is the parameters' root, not the call object around them
    g = reply_grammar([TREE], smol.tool_policy([TREE], "required", None), None, hermes=False)
    assert matches(g, f'<tool_call>[{call("plant", {"v": 1, "kids": [{"v": 2, "kids": []}]})}]</tool_call>')
    assert not matches(g, f'<tool_call>[{call("plant", {"v": 1, "kids": [{"name": "plant", "arguments": {}}]})}]</tool_call>')


def test_tool_choice_none_only_shows_the_tools_so_their_schemas_need_not_compile(smol):
    unenforceable = Tool(function=FunctionDefinition(name="f", parameters={"type": "object", "not": {"required": ["a"]}}, strict=True))
    assert reply_grammar([unenforceable], smol.tool_policy([unenforceable], "none", None), None, hermes=False) is None
    invalid = Tool(function=FunctionDefinition(name="f", parameters={"type": "objekt"}))
    with pytest.raises(InvalidRequest, match="not a valid JSON Schema"):  # still checked as JSON Schema
        reply_grammar([invalid], smol.tool_policy([invalid], "none", None), None, hermes=False)
    with pytest.raises(Unsupported):
        reply_grammar([unenforceable], smol.tool_policy([unenforceable], "auto", None), None, hermes=False)


def test_a_false_schema_is_a_400_not_a_crash():
    with pytest.raises(InvalidRequest, match="accepts no reply"):
        response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": False}})


@pytest.mark.parametrize("kind", ["integer", "string", "array", ["object", "null"]])
def test_tool_parameters_that_are_not_an_object_are_a_400(smol, kind):
    """A forced call with `parameters: {"type": "integer"}` came back as a 200 with raw markup: the grammar
    forced `"arguments": 1`, and no call can carry a non-object. OpenAI refuses such a schema too."""
    bad = Tool(function=FunctionDefinition(name="f", parameters={"type": kind}))
    for choice in ("required", "auto", "none"):
        with pytest.raises(InvalidRequest, match=r"must be the JSON Schema of an object") as refused:
            reply_grammar([bad], smol.tool_policy([bad], choice, None), None, hermes=False)
        assert refused.value.param == "tools[0].function.parameters"
    untyped = Tool(function=FunctionDefinition(name="f", parameters={"properties": {"a": {"type": "integer"}}}))
    check_tools([untyped])  # no `type`: an object by default, as pydantic's and OpenAI's examples
