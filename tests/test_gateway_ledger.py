"""The exact-token ledger: a session's next prompt continues the ids the model saw and wrote."""

from __future__ import annotations

import pytest
from gateway_fakes import tokenizer  # noqa: F401  (fixture)

from gateway.chat_template import ChatRenderer
from gateway.ledger import build_chat_prompt, next_ledger
from gateway.openai_schema import ChatMessage, FunctionCall, FunctionDefinition, Tool, ToolCall

FP = "model-fp"
WEATHER = Tool(function=FunctionDefinition(name="get_weather", parameters={"type": "object", "properties": {"city": {}}}))


@pytest.fixture(scope="module")
def smol(tokenizer):
    return ChatRenderer(tokenizer)


def msg(role: str, content: str | None = None, **kw) -> ChatMessage:
    return ChatMessage(role=role, content=content, **kw)


def turn(smol, messages, reply_ids, content, tools=None, tool_choice=None, ledger=None, calls=()):
    """One turn: the prompt the gateway builds, then the ledger after the model replied `reply_ids`."""
    policy = smol.tool_policy(tools, tool_choice, None)
    prompt = build_chat_prompt(smol, messages, tools, policy, FP, ledger)
    return prompt, next_ledger(smol, prompt, reply_ids, content, list(calls), FP)


def full_ids(smol, messages, tools=None):
    return smol.encode(smol.render(smol.template_messages(messages, tools), tools, add_generation_prompt=True))


def test_next_turn_continues_the_previous_ids(smol):
    history = [msg("system", "You are terse."), msg("user", "Capital of France?")]
    reply = "Paris is the capital."
    first, ledger = turn(smol, history, smol.encode(reply) + [smol.tokenizer.eos_token_id], reply)
    assert first.ledger == "full"
    history += [msg("assistant", reply), msg("user", "And of Spain?")]
    second, _ = turn(smol, history, [], "", ledger=ledger)
    assert second.ledger == "extended"
    assert second.ids[: len(first.ids)] == first.ids  # the whole previous prompt is a prefix ...
    assert second.ids == full_ids(smol, history)  # ... and for ordinary text nothing else differs


def test_the_ids_the_model_generated_are_kept_even_where_retokenizing_differs(smol):
    history = [msg("user", "Spell it.")]
    reply = "Paris"
    odd_ids = [smol.encode(ch)[0] for ch in reply]  # the model wrote it letter by letter
    assert odd_ids != smol.encode(reply)
    first, ledger = turn(smol, history, odd_ids + [smol.tokenizer.eos_token_id], reply)
    history += [msg("assistant", reply), msg("user", "Thanks")]
    second, _ = turn(smol, history, [], "", ledger=ledger)
    assert second.ledger == "extended"
    assert second.ids[: len(first.ids) + len(odd_ids)] == first.ids + odd_ids
    assert second.ids != full_ids(smol, history)


def test_a_tool_call_turn_continues_exactly_through_a_reformatted_echo(smol):
    history = [msg("user", "Weather in Paris?")]
    policy = smol.tool_policy([WEATHER], "required", None)
    generated = smol.encode('"Paris"}}]</tool_call>')  # after the forced prefix; stopped at the closing tag
    first, ledger = turn(smol, history, generated, None, tools=[WEATHER], tool_choice="required",
                         calls=[("get_weather", '{"city": "Paris"}')])  # fmt: skip
    assert first.forced_ids == smol.encode(policy.forced_prefix)
    echo = ToolCall(id="call_x", function=FunctionCall(name="get_weather", arguments='{ "city":"Paris" }'))
    history += [msg("assistant", None, tool_calls=[echo]), msg("tool", '{"temp": 21}', tool_call_id="call_x")]
    second, _ = turn(smol, history, [], "", tools=[WEATHER], ledger=ledger)
    assert second.ledger == "extended"
    assert second.ids[: len(first.ids) + len(generated)] == first.ids + generated


def test_anything_but_a_clean_extension_falls_back_to_full_tokenization(smol):
    history = [msg("user", "Capital of France?")]
    reply = "Paris."
    _, ledger = turn(smol, history, smol.encode(reply) + [2], reply)
    cases = {
        "edited history": [msg("user", "Capital of Italy?"), msg("assistant", reply), msg("user", "Sure?")],
        "edited reply": [history[0], msg("assistant", "Rome."), msg("user", "Sure?")],
        "no new message": [history[0], msg("assistant", reply)],
        "regenerate": history,
    }
    for name, messages in cases.items():
        prompt, _ = turn(smol, messages, [], "", ledger=ledger)
        assert prompt.ledger == "full", name
        assert prompt.ids == full_ids(smol, messages), name
    changed_tools, _ = turn(smol, [*history, msg("assistant", reply), msg("user", "x")], [], "", tools=[WEATHER], ledger=ledger)
    assert changed_tools.ledger == "full"
    other_model = build_chat_prompt(smol, [*history, msg("assistant", reply), msg("user", "x")], None,
                                    smol.tool_policy(None, None, None), "another-fp", ledger)  # fmt: skip
    assert other_model.ledger == "full"


def test_a_reply_cut_at_a_stop_string_is_not_reused(smol):
    history = [msg("user", "Count.")]
    ids = smol.encode("1 2 3 STOP")
    _, ledger = turn(smol, history, ids, "1 2 3 ")  # the client saw the text before the stop string
    assert ledger.reply_digest is None
    prompt, _ = turn(smol, [*history, msg("assistant", "1 2 3 "), msg("user", "More.")], [], "", ledger=ledger)
    assert prompt.ledger == "full"
