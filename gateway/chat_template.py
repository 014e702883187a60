"""Messages + tools -> prompt text and token ids, with the model's own chat template.

Templates that know about tools (they reference `tools`, e.g. Qwen's Hermes format) get the tools
and tool calls as structured data. Templates that do not (SmolLM2's plain ChatML) get them written
into the conversation: the tool list in the system message, assistant calls as SmolLM2's
`<tool_call>[...]</tool_call>` list, tool results as `tool` turns. Both forms come back through
gateway/tool_calls.py.

`tool_choice` never changes the rendered conversation (that would break the cached prefix
between an agent's turns); it changes only what the reply may be, through the grammar the gateway
compiles from it (gateway/grammar.py): "required" and a named function force a call of the listed
function(s), "auto" allows text or well-formed calls, and "none" keeps the tools in the prompt
(vLLM's default too) but parses no calls.
"""

from __future__ import annotations

import functools

import json
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from gateway.errors import InvalidRequest, Unsupported
from gateway.openai_schema import ChatMessage, NamedToolChoice, Tool

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(frozen=True)
class ToolPolicy:
    """What the request allows: parse calls at all, and whether the reply is forced into one."""

    parse: bool  # tools given and tool_choice != "none"
    required: bool = False  # the reply must be calls (tool_choice "required" or a named function)
    forced_prefix: str = ""  # reply text written before generation (none: the grammar forces the markup)
    parallel: bool = True
    names: frozenset[str] = frozenset()  # a call to any other name is not a call (falls back to text)
    stop: tuple[str, ...] = ()  # extra stop strings (none today: the grammar ends a call reply)


def message_text(msg: ChatMessage) -> str:
    """A message's content as one string (text parts joined); other part types are refused."""
    content = msg.content
    if content is None:
        return msg.refusal or ""  # an assistant that refused said so: the model reads what it said
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type in ("text", "input_text", "refusal"):
            text = part.refusal if part.type == "refusal" else part.text
            if text is None:
                raise InvalidRequest(f"a content part of type {part.type!r} needs its `{'refusal' if part.type == 'refusal' else 'text'}`",
                                     param="messages")  # fmt: skip
            texts.append(text)
        else:
            raise Unsupported(f"content parts of type {part.type!r} are not supported: this model reads text only",
                              param="messages")  # fmt: skip
    return "\n".join(texts)


def call_arguments(arguments: str | dict[str, Any]) -> dict[str, Any]:
    """A tool call's arguments as an object (OpenAI sends a JSON string)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise InvalidRequest("a tool call's `arguments` is not valid JSON", param="messages") from None
    if not isinstance(value, dict):
        raise InvalidRequest("a tool call's `arguments` must be a JSON object", param="messages")
    return value


def check_tool_results(messages: list[ChatMessage]) -> None:
    """A `tool` message answers a call an earlier assistant message made (OpenAI's 400 otherwise)."""
    call_ids: set[str] = set()
    for n, msg in enumerate(messages):
        if msg.role == "assistant":
            call_ids.update(c.id for c in msg.tool_calls or [] if c.id)
        elif msg.role == "tool" and msg.tool_call_id is None:
            raise InvalidRequest(f"messages[{n}]: a tool message needs the tool_call_id of the call it answers",
                                 param=f"messages[{n}].tool_call_id")  # fmt: skip
        elif msg.role == "tool" and msg.tool_call_id not in call_ids:
            raise InvalidRequest(f"the tool result for call {msg.tool_call_id!r} answers no tool call of an earlier "
                                 "assistant message", param="messages")  # fmt: skip


class ChatRenderer:
    """Renders conversations for one tokenizer. Pure CPU work: no I/O, no state between calls."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.has_template = isinstance(template, str) and bool(template)
        self.native_tools = self.has_template and "tools" in template
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())

    # -- token ids ------------------------------------------------------------------------
    @functools.cached_property
    def vocab_size(self) -> int:
        """Token ids a request may name: [0, vocab_size) (asked when a request names ids)."""
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: the tokenizer adds what it adds by default (e.g. BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- conversations --------------------------------------------------------------------
    def template_messages(self, messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict]:
        """OpenAI messages -> the dicts the template iterates over (validated)."""
        out: list[dict] = []
        for n, msg in enumerate(messages):
            if msg.role not in ROLES:
                raise InvalidRequest(f"messages[{n}].role {msg.role!r} is not one of {sorted(ROLES)}", param="messages")
            text = message_text(msg)
            if msg.role in ("system", "developer", "user"):
                out.append({"role": "user" if msg.role == "user" else "system", "content": text})
            elif msg.role == "assistant":
                out.append(self._assistant(text, msg))
            else:  # tool / legacy function results
                out.append(self._tool_result(text, msg))
        if tools and not self.native_tools:
            prompt = tools_prompt(tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def render(self, messages: list[dict], tools: list[Tool] | None, add_generation_prompt: bool) -> str:
        if not self.has_template:
            raise InvalidRequest("this model's tokenizer has no chat template; use /v1/completions")
        kwargs: dict[str, Any] = {}
        if tools and self.native_tools:
            kwargs["tools"] = msgspec.to_builtins(tools)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
        except Exception as exc:  # jinja raises TemplateError / raise_exception(...) messages
            raise InvalidRequest(f"the model's chat template rejected these messages: {exc}", param="messages") from None
        if not isinstance(text, str):
            raise InvalidRequest("the model's chat template did not render to text", param="messages")
        return text

    def tool_policy(self, tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None, parallel: bool | None) -> ToolPolicy:
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidRequest("tool_choice needs `tools`", param="tool_choice")
            return ToolPolicy(parse=False)
        by_name = {t.function.name: t for t in tools}
        # No stop string: the grammar ends the reply after the last call, and a stop string could
        # cut a call short where a JSON string argument happens to contain it.
        policy = ToolPolicy(parse=True, parallel=parallel is not False, names=frozenset(by_name))
        if tool_choice in (None, "auto"):
            return policy
        if tool_choice == "none":
            return ToolPolicy(parse=False)
        if tool_choice == "required":
            return replace(policy, required=True)
        if isinstance(tool_choice, NamedToolChoice):
            if tool_choice.function.name not in by_name:
                raise InvalidRequest(f"tool_choice names {tool_choice.function.name!r}, which is not in `tools` "
                                     f"({sorted(by_name)})", param="tool_choice")  # fmt: skip
            return replace(policy, required=True, names=frozenset([tool_choice.function.name]), parallel=False)
        raise InvalidRequest(f"tool_choice {tool_choice!r} is not none, auto, required or a named function", param="tool_choice")

    # -- internals --------------------------------------------------------------------------
    def _assistant(self, text: str, msg: ChatMessage) -> dict:
        if not msg.tool_calls:
            return {"role": "assistant", "content": text}
        calls = [{"name": c.function.name, "arguments": call_arguments(c.function.arguments)} for c in msg.tool_calls]
        if self.native_tools:
            return {"role": "assistant", "content": text,
                    "tool_calls": [{"type": "function", "id": c.id, "function": call} for c, call in zip(msg.tool_calls, calls)]}  # fmt: skip
        markup = f"<tool_call>{json.dumps(calls, ensure_ascii=False)}</tool_call>"
        return {"role": "assistant", "content": f"{text}\n{markup}" if text else markup}

    def _tool_result(self, text: str, msg: ChatMessage) -> dict:
        if self.native_tools:
            out = {"role": "tool", "content": text}
            if msg.tool_call_id:
                out["tool_call_id"] = msg.tool_call_id
            if msg.name:
                out["name"] = msg.name
            return out
        return {"role": "tool", "content": f"<tool_response>\n{text}\n</tool_response>"}


def tools_prompt(tools: list[Tool]) -> str:
    """The tool list written into the system message for templates without tool support.

    SmolLM2's list form, described rather than shown by example: a worked example with a made-up
    function got copied by small models; the grammar (gateway/grammar.py) enforces the format.
    """
    specs = [
        {"name": t.function.name, "description": t.function.description or "", "parameters": t.function.parameters or {}}
        for t in tools
    ]
    return (
        "# Tools\n\n"
        "You may call the functions below.\n"
        f"<tools>{json.dumps(specs, ensure_ascii=False)}</tools>\n\n"
        "To call functions, answer with a list of calls and nothing else:\n"
        '<tool_call>[{"name": <function name>, "arguments": <arguments as a JSON object>}]</tool_call>\n'
        "When no function is needed, answer in plain text."
    )
