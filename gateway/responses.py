"""`/v1/responses` (OpenAI's Responses API) as a thin edge over the chat turn pipeline.

A Responses request is mapped onto a chat request (input items -> messages, flat function tools
-> chat tools, `text.format` -> `response_format`, `max_output_tokens` -> max tokens) and runs
through `TurnPipeline.prepare_chat` / `run`, so it gets everything a chat turn gets: routing,
prefix reuse, tool-call parsing and whatever `tool_choice` / `response_format` guarantee.

`previous_response_id` is a server-side session: every stored response belongs to an agentkv
session (the chain's), and its record (gateway/responses_store.py) holds the conversation as
chat messages including the reply. The next response sends those messages plus its new input in
the same session, so the session ledger recognises the previous turn and the prompt is the
previous turn's exact token ids + the new input (no re-tokenization: a full cache hit).

The chat deltas of a turn become Responses output items in one place (`OutputItems`), for
streamed and whole answers alike, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK

from gateway.api import (
    StreamingOperation,
    chat_prompt_chars,
    check_prompt_size,
    error_responses,
    provide_tenant,
    session_id_of,
    session_ttl_of,
)
from gateway.cluster import ClusterView, Renderers
from gateway.errors import APIError, InvalidRequest, Unsupported, UpstreamError
from gateway.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    Delta,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    SessionId,
    SessionTTL,
    Temperature,
    TokenCount,
    Tool,
    ToolCall,
    TopP,
)
from gateway.reply import InFlight, response_headers
from gateway.responses_store import ResponseNotFound, ResponseStore, StoredResponse
from gateway.sessions import SessionStore
from gateway.tenants import Tenant
from gateway.turn import Outcome, Turn, TurnPipeline
from kvstore.wire import RouteStats

log = logging.getLogger("agentkv.gateway")
_encode = msgspec.json.encode

# ---------------------------------------------------------------------------------------- request


class ResponsesTool(msgspec.Struct, kw_only=True):
    """Responses' flat function tool (`{"type": "function", "name": ..., "parameters": ...}`)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    input: str | list[Any]
    model: str | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    store: bool | None = None  # default true, as OpenAI's
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    truncation: str | None = None  # accepted; agentkv never drops context (a too-long prompt is a 400)
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None  # a stored prompt template: read only to refuse it
    # agentkv extensions (openai client: `extra_body`)
    session_id: SessionId | None = None
    session_ttl_s: SessionTTL | None = None


# --------------------------------------------------------------------------------------- response


class OutputText(msgspec.Struct, kw_only=True):
    text: str
    type: str = "output_text"
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class MessageItem(msgspec.Struct, kw_only=True, tag="message", tag_field="type"):
    id: str
    status: str
    content: list[OutputText]
    role: str = "assistant"


class FunctionCallItem(msgspec.Struct, kw_only=True, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = MessageItem | FunctionCallItem


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # the prompt tokens computed now: every one of them is cached for the next turn


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    agentkv: RouteStats | None = None


class ResponseError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    model: str
    status: str  # in_progress | completed | incomplete | failed
    output: list[OutputItem]
    instructions: str | None
    previous_response_id: str | None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    store: bool
    metadata: dict[str, str]
    user: str | None = None
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: dict[str, str] | None = None
    completed_at: int | None = None
    truncation: str = "disabled"
    background: bool = False
    object: str = "response"


class InputItemList(msgspec.Struct, kw_only=True):
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: str = "list"


class ResponseDeleted(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool = True
    object: str = "response.deleted"


# ------------------------------------------------------------------------ request -> chat request


def input_messages(items: str | list[Any], known_calls: dict[str, str]) -> list[ChatMessage]:
    """Responses input (a string or items) -> chat messages. An assistant message and the
    function calls after it become one assistant message, as the model wrote them in one reply."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    if not items:
        raise InvalidRequest("`input` must not be empty", param="input")
    out: list[ChatMessage] = []
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object (a message or an item), got {type(item).__name__}", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"{where}.role must be one of user, system, developer, assistant; got {role!r}", param="input")
            out.append(ChatMessage(role=role, content=_item_text(item.get("content"), where)))
        elif kind == "function_call":
            call_id, name = _string(item, "call_id", where), _string(item, "name", where)
            call = ToolCall(id=call_id, function=FunctionCall(name=name, arguments=_arguments(item.get("arguments"), where)))
            known_calls[call_id] = name
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
            else:
                out.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            text = _item_text(item.get("output"), where + ".output")
            out.append(ChatMessage(role="tool", tool_call_id=call_id, name=known_calls.get(call_id), content=text))
        else:
            raise Unsupported(f"{where}: input items of type {kind!r} are not supported (message, function_call and "
                              "function_call_output are)", param="input")  # fmt: skip
    return out


def chat_request(req: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    if req.conversation is not None:
        raise Unsupported("`conversation` is not supported: chain responses with previous_response_id", param="conversation")
    if req.background:
        raise Unsupported("background responses are not supported", param="background")
    if req.prompt is not None:
        raise Unsupported("stored prompt templates are not supported: send the prompt as instructions and input", param="prompt")
    system = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    return ChatCompletionRequest(
        model=req.model or "", messages=system + messages, tools=_chat_tools(req.tools), tool_choice=_chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls, max_completion_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, response_format=_response_format(req.text), user=req.user, session_ttl_s=req.session_ttl_s,
    )  # fmt: skip


def _chat_tools(tools: list[ResponsesTool] | None) -> list[Tool] | None:
    out = []
    for n, t in enumerate(tools or []):
        if t.type != "function":
            raise Unsupported(f"tools[{n}]: only function tools are supported, not {t.type!r}", param="tools")
        if not t.name:
            raise InvalidRequest(f"tools[{n}] needs a `name`", param="tools")
        strict = t.strict is not False  # the Responses API's function tools are strict unless they say otherwise
        out.append(Tool(function=FunctionDefinition(name=t.name, description=t.description, parameters=t.parameters, strict=strict)))
    return out or None


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | NamedToolChoice | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return NamedToolChoice(function=NamedFunction(name=choice["name"]))
    raise Unsupported(f"tool_choice {choice!r} is not supported (none, auto, required or {{'type': 'function', "
                      "'name': ...}} are)", param="tool_choice")  # fmt: skip


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text else None
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    raise InvalidRequest(f"text.format.type must be text, json_schema or json_object, got {fmt.get('type')!r}", param="text.format")


def _item_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param="input")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise Unsupported(f"{where}: content parts of type {kind!r} are not supported: this model reads text only", param="input")
    return "".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}.{key} must be a non-empty string", param="input")
    return value


def _arguments(arguments: Any, where: str) -> str:
    try:
        ok = isinstance(arguments, str) and isinstance(json.loads(arguments or "{}"), dict)
    except ValueError:
        ok = False
    if not ok:
        raise InvalidRequest(f"{where}.arguments must be a JSON object encoded as a string", param="input")
    return arguments


def conversation_items(response_id: str, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation a stored response answered, back as Responses items (ids derived from the
    response's, so they are stable from one listing to the next)."""
    items: list[dict[str, Any]] = []

    def add(prefix: str, **fields: Any) -> None:
        items.append({"id": f"{prefix}_{response_id.removeprefix('resp_')}_{len(items)}", "status": "completed", **fields})

    for m in messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])
        if m.role == "tool":
            add("fco", type="function_call_output", call_id=m.tool_call_id, output=text)
        elif m.role != "assistant":
            add("msg", type="message", role=m.role, content=[{"type": "input_text", "text": text}])
        else:
            if text or not m.tool_calls:
                add("msg", type="message", role="assistant", content=[{"type": "output_text", "text": text, "annotations": []}])
            for c in m.tool_calls or []:
                args = c.function.arguments
                add("fc", type="function_call", call_id=c.id, name=c.function.name, arguments=args if isinstance(args, str) else json.dumps(args))
    return items


def page_of(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> InputItemList:
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        at = next((n for n, item in enumerate(ordered) if item["id"] == after), None)
        if at is None:
            raise InvalidRequest(f"no input item {after!r} in this response", param="after")
        ordered = ordered[at + 1 :]
    page = ordered[:limit]
    return InputItemList(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                         has_more=len(ordered) > limit)  # fmt: skip


# --------------------------------------------------------------------------- deltas -> output items


class OutputItems:
    """Chat deltas -> Responses output items, and the stream events that build them.

    Text that is only whitespace is held back until real text follows: before a tool call it is
    formatting, not a message (the whole answer drops it the same way).
    """

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: OutputItem | None = None
        self._held = ""

    def push(self, delta: Delta) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        if delta.content:
            events += self._text(delta.content)
        for call in delta.tool_calls or []:
            if call.id is not None:  # a new call: its name first, arguments follow
                events += self._close()
                self._held = ""
                item = FunctionCallItem(id="fc_" + secrets.token_hex(12), call_id=call.id, name=call.function.name,
                                        arguments="", status="in_progress")  # fmt: skip
                events += self._add(item)
            if call.function and call.function.arguments and isinstance(self._open, FunctionCallItem):
                self._open.arguments += call.function.arguments
                events.append(("response.function_call_arguments.delta",
                               {"item_id": self._open.id, "output_index": len(self.items) - 1, "delta": call.function.arguments}))  # fmt: skip
        return events

    def finish(self, incomplete: bool) -> list[tuple[str, dict]]:
        events = self._text(self._held, force=True) if not self.items else []  # an empty reply is an empty message
        return events + self._close("incomplete" if incomplete else "completed")

    def _text(self, text: str, force: bool = False) -> list[tuple[str, dict]]:
        if not isinstance(self._open, MessageItem):
            if not text.strip() and not force:
                self._held += text
                return []
            text, self._held = self._held + text, ""
            events = self._close()
            item = MessageItem(id="msg_" + secrets.token_hex(12), status="in_progress", content=[])
            events += self._add(item)
            item.content.append(OutputText(text=""))
            events.append(("response.content_part.added", {"item_id": item.id, "output_index": len(self.items) - 1,
                                                           "content_index": 0, "part": msgspec.to_builtins(OutputText(text=""))}))  # fmt: skip
        else:
            events = []
        if text:
            self._open.content[0].text += text
            events.append(("response.output_text.delta", {"item_id": self._open.id, "output_index": len(self.items) - 1,
                                                          "content_index": 0, "delta": text, "logprobs": []}))  # fmt: skip
        return events

    def _add(self, item: OutputItem) -> list[tuple[str, dict]]:
        self.items.append(item)
        self._open = item
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": msgspec.to_builtins(item)})]

    def _close(self, status: str = "completed") -> list[tuple[str, dict]]:
        item, self._open = self._open, None
        if item is None:
            return []
        at = {"item_id": item.id, "output_index": self.items.index(item)}
        item.status = status
        if isinstance(item, MessageItem):
            part = item.content[0]
            events = [("response.output_text.done", {**at, "content_index": 0, "text": part.text, "logprobs": []}),
                      ("response.content_part.done", {**at, "content_index": 0, "part": msgspec.to_builtins(part)})]  # fmt: skip
        else:
            events = [("response.function_call_arguments.done", {**at, "name": item.name, "arguments": item.arguments})]
        return events + [("response.output_item.done", {"output_index": at["output_index"], "item": msgspec.to_builtins(item)})]


# ------------------------------------------------------------------------------------ one response


class ResponseTurn:
    """One Responses request from mapping to storing: the chat turn it runs and what it answers."""

    def __init__(self, req: ResponsesRequest, turn: Turn, history: list[ChatMessage], store: ResponseStore | None) -> None:
        self.req = req
        self.turn = turn
        self.history = history  # the conversation before the reply, instructions excluded
        self.store = store  # None: store=false
        self.id = "resp_" + secrets.token_hex(16)
        self.outcome = Outcome()
        self.items = OutputItems()

    def snapshot(self, status: str) -> ResponseObject:
        req, turn = self.req, self.turn
        done = status != "in_progress"
        reason = {"incomplete_details": {"reason": "max_output_tokens"}} if status == "incomplete" else {}
        return ResponseObject(
            id=self.id, created_at=turn.created, model=turn.model.name, status=status,
            output=list(self.items.items) if done else [], instructions=req.instructions,
            previous_response_id=req.previous_response_id, tools=[msgspec.to_builtins(t) for t in req.tools or []],
            tool_choice=req.tool_choice or "auto", parallel_tool_calls=req.parallel_tool_calls is not False,
            text={"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            temperature=turn.sampling.temperature, top_p=turn.sampling.top_p, max_output_tokens=req.max_output_tokens,
            store=self.store is not None, metadata=req.metadata or {}, user=req.user,
            usage=self._usage() if done else None, completed_at=int(time.time()) if status == "completed" else None, **reason,
        )  # fmt: skip

    def push(self, deltas: list[Delta]) -> list[tuple[str, dict]]:
        return [event for delta in deltas for event in self.items.push(delta)]

    async def finish(self) -> tuple[list[tuple[str, dict]], ResponseObject]:
        """Close the output items, store the response (before the client can ask for it), and say how it ended."""
        incomplete = self.outcome.finish_reason == "length"
        events = self.items.finish(incomplete)
        final = self.snapshot("incomplete" if incomplete else "completed")
        session = self.turn.session
        if self.store is not None and session is not None:  # a stored response always runs in a session
            o = self.outcome
            calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in o.calls]
            reply = ChatMessage(role="assistant", content=o.content, tool_calls=calls or None)  # what the ledger saw
            record = StoredResponse(response=msgspec.to_builtins(final), session_id=session.id, messages=[*self.history, reply])
            await self.store.save(self.turn.tenant.id, record, session.ttl_s)
        return events, final

    def _usage(self) -> ResponseUsage:
        u = self.outcome.usage(self.turn)
        cached = u.prompt_tokens_details.cached_tokens
        return ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                             input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=u.prompt_tokens - cached),
                             output_tokens_details=OutputTokensDetails(), agentkv=u.agentkv)  # fmt: skip


async def _events(rt: ResponseTurn, first: list[Delta], rest: AsyncIterator[list[Delta]]) -> AsyncIterator[ServerSentEventMessage]:
    """The SSE events of a streamed response: lifecycle, item and delta events, numbered."""
    numbers = itertools.count()

    def event(kind: str, fields: dict) -> ServerSentEventMessage:
        body = {"type": kind, "sequence_number": next(numbers), **fields}
        return ServerSentEventMessage(data=_encode(body).decode(), event=kind)

    try:
        yield event("response.created", {"response": rt.snapshot("in_progress")})
        yield event("response.in_progress", {"response": rt.snapshot("in_progress")})
        for kind, fields in rt.push(first):
            yield event(kind, fields)
        async for deltas in rest:
            for kind, fields in rt.push(deltas):
                yield event(kind, fields)
        closing, final = await rt.finish()
        for kind, fields in closing:
            yield event(kind, fields)
        yield event(f"response.{final.status}", {"response": final})
    except Exception as exc:  # headers are gone: the error travels as the stream's last events
        if not isinstance(exc, APIError):
            log.exception("response stream %s failed", rt.id, exc_info=exc)
            exc = APIError("internal gateway error (see the gateway log)")
        failed = rt.snapshot("failed")
        # response.error.code is one of OpenAI's few codes; agentkv's own code travels in the error event
        failed.error = ResponseError(code="invalid_prompt" if exc.status_code == 400 else "server_error", message=exc.message)
        yield event("error", {"code": exc.code or exc.type, "message": exc.message, "param": exc.param})
        yield event("response.failed", {"response": failed})
    finally:
        with anyio.CancelScope(shield=True):  # the pipeline's finally aborts unfinished work
            await rest.aclose()


# ------------------------------------------------------------------------------------------- HTTP


def _response_store(sessions: SessionStore) -> ResponseStore:
    return ResponseStore(sessions.redis, sessions.prefix)  # same Redis and key prefix as the sessions


async def _previous(store: ResponseStore, tenant: Tenant, response_id: str) -> StoredResponse:
    """The response to continue; an unknown one is a 400 naming the parameter, as OpenAI answers."""
    try:
        return await store.load(tenant.id, response_id)
    except ResponseNotFound as exc:
        raise InvalidRequest(f"Previous response with id {response_id!r} not found (it expired, was deleted, was "
                             "created with store=false, or belongs to another API key).", param="previous_response_id",
                             code="previous_response_not_found") from exc  # fmt: skip


async def referenced_items(store: ResponseStore, tenant: Tenant, items: str | list[Any]) -> str | list[Any]:
    """`input` with each `{"type": "item_reference", "id": ...}` replaced by the stored output item it names
    (a client that keeps the ids of earlier replies sends them instead of their text); an unknown id is a 400."""
    if isinstance(items, str):
        return items
    refs = {n: item.get("id") for n, item in enumerate(items) if isinstance(item, dict) and item.get("type") == "item_reference"}
    if not refs:
        return items
    for n, item_id in refs.items():
        if not isinstance(item_id, str) or not item_id:
            raise InvalidRequest(f"input[{n}].id must be a non-empty string", param="input")
    found = await store.items(tenant.id, sorted(set(refs.values())))
    for n, item_id in refs.items():
        if item_id not in found:
            raise InvalidRequest(f"input[{n}]: item {item_id!r} not found (only the output items of stored responses can be "
                                 "referenced; they expire with their response, and go when it is deleted)", param="input")  # fmt: skip
    return [found[refs[n]] if n in refs else item for n, item in enumerate(items)]


async def prepare_response(request: Request, data: ResponsesRequest, tenant: Tenant, turns: TurnPipeline,
                           sessions: SessionStore, cluster: ClusterView, renderers: Renderers) -> ResponseTurn:  # fmt: skip
    """The chain so far + the new input -> a prepared chat turn in the chain's session."""
    data.session_ttl_s = session_ttl_of(request, data.session_ttl_s)
    store = _response_store(sessions)
    previous = await _previous(store, tenant, data.previous_response_id) if data.previous_response_id else None
    before = previous.messages if previous else []
    known_calls = {c.id: c.function.name for m in before for c in m.tool_calls or [] if c.id}
    history = [*before, *input_messages(await referenced_items(store, tenant, data.input), known_calls)]
    stored = data.store is not False
    # The chain is the session: a continued response runs in its chain's session, a new one in
    # the session the client names (header, session_id, prompt_cache_key, user) or a fresh one.
    session_id = previous.session_id if previous else session_id_of(request, data.session_id, data.prompt_cache_key, data.user)
    fresh_chain = session_id is None and stored
    if fresh_chain:
        session_id = "resp_chain_" + secrets.token_hex(12)
    chat = chat_request(data, history)
    await check_prompt_size(chat_prompt_chars(chat), cluster, renderers, field="input")  # a 2 MB input is a 400 before rendering
    try:
        turn = await turns.prepare_chat(chat, tenant, session_id, field="input")
    except APIError as exc:  # the chat request is ours: what it names `messages` the client sent as `input`
        if exc.param and exc.param.startswith("messages"):
            exc.param = "input"
        raise
    if fresh_chain:  # its ledger is kept, but its blocks are pinned only once the chain is continued:
        turn = dataclasses.replace(turn, pin=False)  # most responses are never continued (e.g. full-history clients)
    return ResponseTurn(data, turn, history, store if stored else None)


async def answer(rt: ResponseTurn, deltas: AsyncIterator[list[Delta]], stream: bool) -> Response:
    """The whole response, or its events; a failure before the first token is a plain HTTP error."""
    if not stream:
        async with contextlib.aclosing(deltas):
            async for chunk in deltas:
                rt.push(chunk)
        _, final = await rt.finish()
        return Response(final, headers=response_headers(rt.turn, rt.outcome))
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        raise UpstreamError("the worker stream ended before the first token") from None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await deltas.aclose()
        raise
    return ServerSentEvent(_events(rt, first, deltas), headers=response_headers(rt.turn, rt.outcome))


class ResponsesController(Controller):
    path = "/v1/responses"
    dependencies = {"tenant": Provide(provide_tenant)}
    tags = ["openai"]

    @post("/", status_code=HTTP_200_OK, summary="Create a response (OpenAI Responses API)",
          responses=error_responses(400, 401, 413, 500, 502, 503), operation_class=StreamingOperation)
    async def create(
        self, request: Request, data: JSONBody[ResponsesRequest], tenant: NamedDependency[Tenant],
        turns: NamedDependency[TurnPipeline], sessions: NamedDependency[SessionStore], cluster: NamedDependency[ClusterView],
        renderers: NamedDependency[Renderers], inflight: NamedDependency[InFlight],
    ) -> Response[ResponseObject]:  # fmt: skip
        rt = await prepare_response(request, data, tenant, turns, sessions, cluster, renderers)
        deltas = inflight.track(turns.run(rt.turn, rt.outcome))  # counted, and ended cleanly when the gateway stops
        return await answer(rt, deltas, data.stream)

    @get("/{response_id:str}", summary="A stored response", responses=error_responses(401, 404, 500, 503))
    async def retrieve(self, response_id: FromPath[str], tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]) -> ResponseObject:
        return msgspec.convert((await _response_store(sessions).load(tenant.id, response_id)).response, ResponseObject)

    @get("/{response_id:str}/input_items", summary="The items a stored response answered (its chain's conversation)",
         responses=error_responses(400, 401, 404, 500, 503))  # fmt: skip
    async def input_items(
        self, response_id: FromPath[str], tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore],
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20, order: FromQuery[Literal["asc", "desc"]] = "desc",
        after: FromQuery[str | None] = None,
    ) -> InputItemList:  # fmt: skip
        record = await _response_store(sessions).load(tenant.id, response_id)
        return page_of(conversation_items(response_id, record.messages[:-1]), limit, order, after)  # [-1]: its reply

    @delete("/{response_id:str}", status_code=HTTP_200_OK, summary="Delete a stored response",
            responses=error_responses(401, 404, 500, 503))
    async def remove(self, response_id: FromPath[str], tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]) -> ResponseDeleted:
        await _response_store(sessions).delete(tenant.id, response_id)
        return ResponseDeleted(id=response_id)


__all__ = ["ResponsesController", "ResponsesRequest", "OutputItems", "input_messages", "chat_request"]
