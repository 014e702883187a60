"""The exact-token ledger: the next turn's prompt ids are the ids the model actually saw and wrote.

Re-tokenizing a conversation does not always give back the ids that were generated (BPE merges
differ at boundaries; tool-call JSON comes back re-serialized by the client), and any difference
moves the cached prefix's end to the first differing block. So for a session the gateway keeps
the last turn's ids: `context_ids` (the rendered conversation up to the generation prompt) and
`reply_ids` (forced prefix + generated ids). When a request's messages are the previous request's
messages, then the assistant reply we returned, then new messages, its prompt is

    context_ids + reply_ids + encode(end of the assistant turn + the new messages, rendered)

The check is exact and cheap: the previous messages must render (with today's tools) to the same
text (`context_digest`), the echoed assistant message must equal what we returned (`reply_digest`:
content and tool calls, JSON compared canonically), and the template must render the old
conversation as a prefix of the new one. Anything else (edited history, other tools, a template
that rewrites earlier turns) falls back to a full tokenization: correct, just fewer cache hits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgspec
import xxhash

from gateway.chat_template import ChatRenderer, ToolPolicy, call_arguments, message_text
from gateway.errors import InvalidRequest
from gateway.openai_schema import ChatMessage, Tool


class Ledger(msgspec.Struct, kw_only=True):
    fingerprint: str  # model the ids belong to
    n_messages: int  # messages of the request that produced `context_ids`
    context_digest: int  # xxh3 of that conversation's rendered text (with the generation prompt)
    context_ids: list[int]
    reply_ids: list[int]
    reply_digest: int | None  # None: the reply can't be re-used exactly (e.g. cut at a stop string)


@dataclass
class ChatPrompt:
    ids: list[int]  # what the model gets: conversation, then the forced reply prefix
    context_len: int  # ids[:context_len] is the conversation up to the generation prompt
    context_digest: int
    n_messages: int
    ledger: str  # "extended" | "full"

    @property
    def forced_ids(self) -> list[int]:
        return self.ids[self.context_len :]


def build_chat_prompt(
    renderer: ChatRenderer,
    messages: list[ChatMessage],
    tools: list[Tool] | None,
    policy: ToolPolicy,
    fingerprint: str,
    ledger: Ledger | None = None,
) -> ChatPrompt:
    if not messages:
        raise InvalidRequest("`messages` must not be empty", param="messages")
    forced = renderer.encode(policy.forced_prefix) if policy.forced_prefix else []
    if ledger is not None and ledger.fingerprint == fingerprint:
        extended = _extend(renderer, messages, tools, ledger)
        if extended is not None:
            ids, digest = extended
            return ChatPrompt(ids + forced, len(ids), digest, len(messages), "extended")
    text = renderer.render(renderer.template_messages(messages, tools), tools, add_generation_prompt=True)
    ids = renderer.encode(text)
    return ChatPrompt(ids + forced, len(ids), _digest(text), len(messages), "full")


def next_ledger(
    renderer: ChatRenderer,
    prompt: ChatPrompt,
    output_ids: list[int],
    content: str | None,
    calls: list[tuple[str, str]],
    fingerprint: str,
) -> Ledger:
    """The ledger after a turn, given what the client was told (content and (name, arguments) calls)."""
    reply_ids = prompt.forced_ids + list(output_ids)
    exact = bool(calls) or (content or "") == renderer.decode(reply_ids, skip_special_tokens=True)
    return Ledger(
        fingerprint=fingerprint,
        n_messages=prompt.n_messages,
        context_digest=prompt.context_digest,
        context_ids=prompt.ids[: prompt.context_len],
        reply_ids=reply_ids,
        reply_digest=reply_digest(content, calls) if exact else None,
    )


def reply_digest(content: str | None, calls: list[tuple[str, str]]) -> int:
    """Digest of an assistant message as the client sees it (call ids and JSON spacing ignored)."""
    canonical = [(name, json.dumps(json.loads(args) if isinstance(args, str) else args, sort_keys=True)) for name, args in calls]
    return _digest(json.dumps([(content or "").strip(), canonical]))


def echoed_digest(msg: ChatMessage) -> int | None:
    if msg.role != "assistant":
        return None
    try:
        text = message_text(msg)
        calls = [(c.function.name, json.dumps(call_arguments(c.function.arguments))) for c in msg.tool_calls or []]
    except Exception:  # malformed echo: no exact continuation (full rendering reports the error)
        return None
    return reply_digest(text, calls)


def _extend(renderer: ChatRenderer, messages: list[ChatMessage], tools: list[Tool] | None, ledger: Ledger) -> tuple[list[int], int] | None:
    k = ledger.n_messages
    if ledger.reply_digest is None or len(messages) <= k + 1 or echoed_digest(messages[k]) != ledger.reply_digest:
        return None
    before = renderer.template_messages(messages[:k], tools)
    context = renderer.render(before, tools, add_generation_prompt=True)
    if _digest(context) != ledger.context_digest:
        return None
    eos = renderer.eos_ids
    body = ledger.reply_ids[:-1] if ledger.reply_ids and ledger.reply_ids[-1] in eos else ledger.reply_ids
    turn = before + [{"role": "assistant", "content": renderer.decode(body)}]  # the exact text, call markup included
    upto_reply = renderer.render(turn, tools, add_generation_prompt=False)
    full = renderer.render(turn + renderer.template_messages(messages[k + 1 :], None), tools, add_generation_prompt=True)
    reply_text = renderer.decode(ledger.reply_ids)
    if not (upto_reply.startswith(context) and full.startswith(upto_reply)):
        return None
    rendered_reply = upto_reply[len(context) :]
    if not rendered_reply.startswith(reply_text):
        return None
    tail = rendered_reply[len(reply_text) :] + full[len(upto_reply) :]
    return ledger.context_ids + ledger.reply_ids + renderer.encode(tail), _digest(full)


def _digest(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode())

