"""Tool calls out of model text: both formats, streaming equals whole-text parsing, fallbacks."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tool_calls import CallDelta, ContentDelta, ParsedCall, ToolCallParser


def parse_tool_calls(text: str, parallel: bool = True, names: frozenset[str] | None = None) -> tuple[str, list[ParsedCall]]:
    """Whole-text parse: (content, calls)."""
    parser = ToolCallParser(parallel=parallel, names=names)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls


SMOL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]</tool_call>'
HERMES = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')  # fmt: skip


def stream(text: str, pieces: list[int], **kwargs) -> tuple[ToolCallParser, list]:
    """Feed `text` cut at the given positions; returns the parser and every delta."""
    parser = ToolCallParser(**kwargs)
    deltas, start = [], 0
    for cut in sorted(set(pieces)) + [len(text)]:
        deltas += parser.feed(text[start:cut])
        start = cut
    deltas += parser.finish()
    return parser, deltas


def test_smollm2_list_form_gives_every_call():
    content, calls = parse_tool_calls(SMOL)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_hermes_single_object_blocks_give_every_call():
    _, calls = parse_tool_calls(HERMES)
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_text_before_a_call_is_content_and_whitespace_between_calls_is_not():
    content, calls = parse_tool_calls("Let me check.\n" + HERMES + "\n")
    assert content == "Let me check.\n"
    assert len(calls) == 2


def test_arguments_as_a_json_string_and_braces_inside_strings():
    text = '<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"a}b{\\"}"}</tool_call>'
    _, calls = parse_tool_calls(text)
    assert json.loads(calls[0].arguments) == {"q": "a}b{"}


def test_output_that_does_not_parse_falls_back_to_plain_content():
    for text in ["<tool_call>this is not json</tool_call> ok", '<tool_call>[{"arguments": {}}]</tool_call>',
                 '<tool_call>[{"name": "f", "arguments": [1, 2]}]</tool_call>', "<tool_call>[{\"name\": \"f\", "]:  # fmt: skip
        content, calls = parse_tool_calls(text)
        assert calls == [] and content == text


def test_json_the_partial_parser_chokes_on_is_content_not_a_crash():
    """partial_json_parser raises IndexError / AssertionError (not ValueError) on some broken texts: seen
    from the real model before constrained decoding; a parse error must never become a 500."""
    for text in ['<tool_call>[{"a": 1}}]</tool_call>', '<tool_call>[{"name": "x", "arguments": {"a": }}]}</tool_call>',
                 '<tool_call>[{"a":[}]</tool_call>', "<tool_call>[{]"]:  # fmt: skip
        content, calls = parse_tool_calls(text)
        assert calls == [] and content == text


def test_unknown_function_names_are_not_calls():
    content, calls = parse_tool_calls(SMOL, names=frozenset({"get_time"}))
    assert calls == [] and content == SMOL


def test_a_truncated_trailing_call_is_dropped_when_others_parsed():
    content, calls = parse_tool_calls('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "argu')
    assert [c.name for c in calls] == ["a"] and content == ""


def test_parallel_false_keeps_only_the_first_call():
    _, calls = parse_tool_calls(SMOL, parallel=False)
    assert [c.name for c in calls] == ["get_weather"]


def test_plain_text_streams_through_except_a_possible_tag_start():
    parser = ToolCallParser()
    assert parser.feed("Hello <to") == [ContentDelta("Hello ")]
    assert parser.feed("day") == [ContentDelta("<today")]
    assert parser.finish() == []


def test_streamed_deltas_follow_openai_shape():
    _, deltas = stream(SMOL, list(range(0, len(SMOL), 3)))
    calls = [d for d in deltas if isinstance(d, CallDelta)]
    firsts = [d for d in calls if d.id is not None]
    assert [(d.index, d.name, d.arguments) for d in firsts] == [(0, "get_weather", ""), (1, "get_time", "")]
    for index in (0, 1):  # later deltas carry argument fragments only
        later = [d for d in calls if d.index == index and d.id is None]
        assert all(d.name is None for d in later)
        assert json.loads("".join(d.arguments for d in later))


@settings(max_examples=150, deadline=None)
@given(
    text=st.sampled_from([SMOL, HERMES, "Sure! " + SMOL, "no tools here <tool", "<tool_call>[{\"na", "a<tool_call>x</tool_call>"]),
    cuts=st.lists(st.integers(0, 250), max_size=12),
)
def test_streaming_in_any_chunking_equals_whole_text(text, cuts):
    whole_content, whole_calls = parse_tool_calls(text)
    parser, deltas = stream(text, [c for c in cuts if c <= len(text)])
    assert parser.content == whole_content
    assert "".join(d.text for d in deltas if isinstance(d, ContentDelta)) == whole_content
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in whole_calls]
