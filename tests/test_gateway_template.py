"""Messages and tools -> prompt text, with the real SmolLM2 tokenizer and a Hermes-style template."""

from __future__ import annotations

import json

import jinja2
import pytest
from gateway_fakes import tokenizer  # noqa: F401  (fixture)

from gateway.chat_template import ChatRenderer, check_tool_results
from gateway.errors import InvalidRequest, Unsupported
from gateway.openai_schema import (
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolCall,
)

WEATHER = Tool(function=FunctionDefinition(name="get_weather", description="Weather of a city",
                                           parameters={"type": "object", "properties": {"city": {"type": "string"}}}))  # fmt: skip
CLOCK = Tool(function=FunctionDefinition(name="get_time", parameters={}))


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


@pytest.fixture(scope="module")
def smol(tokenizer):
    return ChatRenderer(tokenizer)


def test_plain_chat_is_the_models_own_template(smol, tokenizer):
    messages = msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Capital of France?"))
    text = smol.render(smol.template_messages(messages, None), None, add_generation_prompt=True)
    expected = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert text == expected


def test_developer_is_system_and_text_parts_are_joined(smol):
    parts = [ContentPart(type="text", text="a"), ContentPart(type="text", text="b")]
    out = smol.template_messages([ChatMessage(role="developer", content="rules"), ChatMessage(role="user", content=parts)], None)
    assert out == [{"role": "system", "content": "rules"}, {"role": "user", "content": "a\nb"}]


def test_an_assistants_refusal_is_read_as_what_it_said(smol):
    """OpenAI returns `refusal` on a message; clients send it back in the history, as a field or a part."""
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I can't help with that."}]
    as_field = smol.template_messages([ChatMessage(role="user", content="hi"),
                                       ChatMessage(role="assistant", content=None, refusal="I can't help with that.")], None)  # fmt: skip
    as_part = smol.template_messages([ChatMessage(role="user", content="hi"), ChatMessage(
        role="assistant", content=[ContentPart(type="refusal", refusal="I can't help with that.")])], None)  # fmt: skip
    assert as_field == as_part == said
    with pytest.raises(InvalidRequest, match="needs its `text`"):
        smol.template_messages([ChatMessage(role="user", content=[ContentPart(type="text")])], None)


def test_non_text_parts_and_unknown_roles_are_clear_400s(smol):
    with pytest.raises(Unsupported, match="image_url"):
        smol.template_messages([ChatMessage(role="user", content=[ContentPart(type="image_url", image_url={"url": "x"})])], None)
    with pytest.raises(InvalidRequest, match="role"):
        smol.template_messages([ChatMessage(role="robot", content="beep")], None)


def test_tools_go_into_the_system_message_for_a_template_without_tool_support(smol):
    assert not smol.native_tools
    out = smol.template_messages(msgs(("system", "Be brief."), ("user", "Weather?")), [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>[{" in out[0]["content"]
    inserted = smol.template_messages(msgs(("user", "Weather?")), [WEATHER])
    assert inserted[0]["role"] == "system" and inserted[1] == {"role": "user", "content": "Weather?"}


def test_assistant_calls_and_tool_results_are_written_in_smollm2_form(smol):
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    out = smol.template_messages([ChatMessage(role="assistant", tool_calls=[call]),
                                  ChatMessage(role="tool", tool_call_id="call_1", content='{"temp": 21}')], None)  # fmt: skip
    assert out[0] == {"role": "assistant", "content": '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'}
    assert out[1] == {"role": "tool", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'}


def test_tool_choice_decides_what_the_reply_may_be_never_the_prompt(smol):
    auto = smol.tool_policy([WEATHER, CLOCK], "auto", None)
    assert auto.parse and not auto.required and auto.stop == ()  # the grammar ends a reply, not a stop string
    assert not smol.tool_policy([WEATHER], "none", None).parse
    required = smol.tool_policy([WEATHER, CLOCK], "required", None)
    assert required.required and required.names == {"get_weather", "get_time"} and required.parallel
    named = smol.tool_policy([WEATHER, CLOCK], NamedToolChoice(function=NamedFunction(name="get_time")), True)
    assert named.required and named.names == {"get_time"} and not named.parallel
    assert all(p.forced_prefix == "" for p in (auto, required, named))  # the grammar forces the markup
    with pytest.raises(InvalidRequest, match="not in `tools`"):
        smol.tool_policy([WEATHER], NamedToolChoice(function=NamedFunction(name="nope")), None)
    with pytest.raises(InvalidRequest, match="needs `tools`"):
        smol.tool_policy(None, "required", None)


def test_the_tool_prompt_shows_no_made_up_function(smol):
    prompt = smol.template_messages(msgs(("user", "Weather?")), [WEATHER])[0]["content"]
    assert "get_stock_price" not in prompt and "AAPL" not in prompt
    assert '<tool_call>[{"name": <function name>, "arguments":' in prompt


def test_a_tool_result_must_answer_an_earlier_call():
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments="{}"))
    ok = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", tool_calls=[call]),
          ChatMessage(role="tool", tool_call_id="call_1", content="21")]  # fmt: skip
    check_tool_results(ok)
    with pytest.raises(InvalidRequest, match="answers no tool call"):
        check_tool_results([ChatMessage(role="user", content="hi"), ChatMessage(role="tool", tool_call_id="call_9", content="21")])
    with pytest.raises(InvalidRequest, match="call_2"):
        check_tool_results([*ok, ChatMessage(role="tool", tool_call_id="call_2", content="x")])
    with pytest.raises(InvalidRequest, match="needs the tool_call_id") as missing:  # OpenAI requires it too
        check_tool_results([*ok, ChatMessage(role="tool", content="x")])
    assert missing.value.param == "messages[3].tool_call_id"


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class HermesTokenizer:
    """Just enough of a tokenizer whose template knows `tools` (like Qwen's)."""

    chat_template = HERMES_TEMPLATE
    eos_token_id = 2

    def __init__(self) -> None:
        env = jinja2.Environment()
        env.filters["tojson"] = lambda v: json.dumps(v)
        self._template = env.from_string(HERMES_TEMPLATE)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, tools=None):
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


def test_a_template_with_tool_support_gets_tools_and_calls_as_data():
    hermes = ChatRenderer(HermesTokenizer())
    assert hermes.native_tools
    call = ToolCall(id="c1", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}'))
    messages = [ChatMessage(role="user", content="Weather?"), ChatMessage(role="assistant", tool_calls=[call])]
    text = hermes.render(hermes.template_messages(messages, [WEATHER]), [WEATHER], add_generation_prompt=False)
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    policy = hermes.tool_policy([WEATHER, CLOCK], "required", None)
    assert policy.required and policy.stop == ()  # one block per call
