"""`Client` and `AsyncClient`: the `openai` clients (`.openai`: errors, retries, timeouts, streams)
plus what an agentkv gateway adds: `/v1/sessions`, `X-Session-Id`, per-turn `TurnStats` and sessions.

Sync and async share one implementation: an operation is a generator of steps that yields what the
openai client returned (a value, or an awaitable from `AsyncOpenAI`) and is sent the value back;
only the two `_drive` methods and the two `chat_stream` loops differ.
"""

from __future__ import annotations

import os
import time
from urllib.parse import quote
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from openai import NOT_GIVEN, AsyncOpenAI, BaseModel, OpenAI, OpenAIError
from openai.lib.streaming.chat import ChatCompletionStreamState

from agentkv.session import AsyncSession, Session
from agentkv.tools import Tool, ToolCall, ToolRegistry, tool
from kvstore.wire import ROUTE_HEADER, RouteStats

__all__ = ["AsyncClient", "ChatResult", "Client", "Done", "SessionInfo", "TextDelta", "ToolCallEvent", "TurnStats"]

SESSION_HEADER = "X-Session-Id"
Steps = Generator[Any, Any, Any]


class TurnStats(RouteStats, kw_only=True):
    """One model call: the gateway's RouteStats plus what the client measured. `ttft_s`: time to the
    first streamed chunk (None if not streamed). Other servers fill in only the token counts."""

    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


@dataclass
class ChatResult:
    """A finished assistant turn. `message` is exactly what to append to the history."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    stats: TurnStats
    id: str = ""
    model: str = ""

    @property
    def message(self) -> dict[str, Any]:
        calls = {"tool_calls": [c.to_openai() for c in self.tool_calls]} if self.tool_calls else {}
        return {"role": "assistant", "content": self.content, **calls}


@dataclass(frozen=True)
class TextDelta:
    text: str  # a piece of assistant text, as it streams


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall  # a tool call whose name and arguments are complete


@dataclass(frozen=True)
class Done:
    result: ChatResult  # the end of the stream: the whole turn, with its stats


StreamEvent = TextDelta | ToolCallEvent | Done


class SessionInfo(BaseModel):
    """The gateway's session record (`/v1/sessions/{id}`); its other fields (tenant, created_at,
    last_used_at, completion_tokens, prefilled_tokens, transferred_*) are kept as attributes too."""

    id: str
    ttl_s: float | None = None
    expires_at: float | None = None
    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    node: str | None = None  # the decode node holding the session's blocks


class SessionList(BaseModel):
    data: list[SessionInfo]


def _result(completion: Any, headers: Mapping[str, str], started: float, ttft_s: float | None) -> ChatResult:
    """A ChatResult from an openai ChatCompletion (or a stream's final snapshot) and the response headers."""
    if not completion.choices:
        raise OpenAIError("the server's reply has no choices (no completion to read)")
    choice, usage = completion.choices[0], completion.usage
    calls = [ToolCall(c.id, c.function.name, c.function.arguments or "{}") for c in choice.message.tool_calls or ()]
    stats: dict[str, Any] = {"ttft_s": ttft_s, "latency_s": time.perf_counter() - started}
    if usage is None:  # a stream without usage: the header, sent before decoding (`source=planned`)
        stats |= msgspec.structs.asdict(RouteStats.from_header(headers.get(ROUTE_HEADER)) or RouteStats())
    else:
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        stats |= {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "cached_tokens": cached or 0, **(usage.model_extra or {}).get("agentkv", {})}  # fmt: skip
    content = choice.message.content if choice.message.content or not calls else None  # "" before calls: no text
    return ChatResult(content, calls, choice.finish_reason, msgspec.convert(stats, TurnStats), completion.id, completion.model)


class _Fold:
    """A streamed completion read chunk by chunk: openai's stream state, our events, the TTFT."""

    def __init__(self) -> None:
        self.state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
        self.started = time.perf_counter()
        self.ttft_s: float | None = None
        self.chunks = 0

    def feed(self, chunk: Any) -> list[StreamEvent]:
        self.chunks += 1
        if self.ttft_s is None and chunk.choices:
            self.ttft_s = time.perf_counter() - self.started
        events: list[StreamEvent] = []
        for event in self.state.handle_chunk(chunk):
            if event.type == "content.delta" and event.delta:
                events.append(TextDelta(event.delta))
            elif event.type == "tool_calls.function.arguments.done":
                call_id = self.state.current_completion_snapshot.choices[0].message.tool_calls[event.index].id
                events.append(ToolCallEvent(ToolCall(call_id, event.name, event.arguments or "{}")))
        return events

    def result(self, headers: Mapping[str, str]) -> ChatResult:
        if not self.chunks:
            raise OpenAIError("the stream ended before its first chunk (no completion to read)")
        return _result(self.state.current_completion_snapshot, headers, self.started, self.ttft_s)


class _Base:
    """What both clients share, written once as steps (see the module docstring)."""

    _openai_class: Any
    _session_class: type[Session]
    _drive: Callable[[Steps], Any]  # run the steps, return their value (async: a coroutine that does)
    _next_chunk: Callable[[Any], Any]  # a stream's next chunk, None at its end
    _run_tools: Callable[[ToolRegistry, Sequence[ToolCall]], Any]

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 **openai_options: Any) -> None:  # fmt: skip
        """`base_url` defaults to $AGENTKV_BASE_URL, then http://127.0.0.1:8000 (a trailing /v1 is fine);
        `api_key` to $AGENTKV_API_KEY; `model` to the first the server lists. `openai_options` go to
        the openai client: timeout, max_retries, default_headers, http_client, ..."""
        self.base_url = (base_url or os.environ.get("AGENTKV_BASE_URL") or "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} needs a scheme: http://{self.base_url}")
        self.model = model
        api_key = api_key or os.environ.get("AGENTKV_API_KEY") or "none"  # an open gateway ignores it
        self.openai = self._openai_class(base_url=f"{self.base_url}/v1", api_key=api_key, **openai_options)

    def _send(self, messages: Sequence[dict[str, Any]], *, stream: bool, tools: Iterable[Any] | None = None,
              tool_choice: Any = None, session_id: str | None = None, model: str | None = None, **params: Any) -> Steps:  # fmt: skip
        """Post a chat completion -> (a _Fold started just before, openai's raw response). openai's own
        request options (timeout, extra_headers, extra_query, extra_body) keep their meaning; any
        other keyword is a body field."""
        if not (model := model or self.model):
            page = yield self.openai.models.list()
            if not page.data:
                raise OpenAIError("the server lists no models (are the workers up?)")
            model = self.model = page.data[0].id
        if callable(tool_choice) and not isinstance(tool_choice, Tool):
            tool_choice = tool(tool_choice)
        if isinstance(tool_choice, Tool | str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": getattr(tool_choice, "name", tool_choice)}}
        specs = [t if isinstance(t, Mapping) else (t if isinstance(t, Tool) else tool(t)).spec for t in tools or ()]
        usage = {"include_usage": True, **params.pop("stream_options", {})} if stream else NOT_GIVEN
        headers = {**(params.pop("extra_headers", None) or {}), **({SESSION_HEADER: session_id} if session_id else {})}
        options = {k: params.pop(k) for k in ("timeout", "extra_query") if k in params}
        extra_body = params.pop("extra_body", None) or {}
        body = {**params, **extra_body}
        return _Fold(), (yield self.openai.chat.completions.with_raw_response.create(
            model=model, messages=list(messages), tools=specs or NOT_GIVEN, stream=stream, stream_options=usage,
            tool_choice=NOT_GIVEN if tool_choice is None else tool_choice, extra_body=body,
            extra_headers=headers or None, **options))  # fmt: skip

    def _turn(self, messages: Sequence[dict[str, Any]], *, stream: bool, **kwargs: Any) -> Steps:
        """One chat completion -> ChatResult; streamed (and so timed to the first token) if `stream`."""
        fold, raw = yield from self._send(messages, stream=stream, **kwargs)
        if not stream:
            return _result(raw.parse(), raw.headers, fold.started, None)
        chunks = raw.parse()
        while (chunk := (yield self._next_chunk(chunks))) is not None:
            fold.feed(chunk)
        return fold.result(raw.headers)

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> ChatResult:
        """One chat completion. Keywords: tools, tool_choice, session_id, model; any other goes into
        the request body unchanged (docs/sdk.md)."""
        return self._drive(self._turn(messages, stream=False, **kwargs))

    def create_session(self, id: str | None = None, *, ttl_s: float | None = None) -> SessionInfo:
        body = {k: v for k, v in {"id": id, "ttl_s": ttl_s}.items() if v is not None}
        return self.openai.post("/sessions", body=body, cast_to=SessionInfo)

    def get_session(self, id: str) -> SessionInfo:
        return self.openai.get(_session_path(id), cast_to=SessionInfo)

    def list_sessions(self) -> SessionList:
        return self.openai.get("/sessions", cast_to=SessionList)

    def delete_session(self, id: str) -> Any:  # the gateway releases the session's pinned KV blocks
        return self.openai.delete(_session_path(id), cast_to=object)

    def session(self, id: str | None = None, *, system: str | None = None, tools: Iterable[Any] = (),
                ttl_s: float | None = None, create: bool = True, **defaults: Any) -> Session:  # fmt: skip
        """A server-side session that keeps its own history; `defaults` apply to every call."""
        return self._session_class(self, id, system=system, tools=tools, ttl_s=ttl_s, create=create, **defaults)


def _session_path(id: str) -> str:
    """A session id may hold any character but whitespace ("team/agent-1", "a?b"): escaped whole."""
    return f"/sessions/{quote(id, safe='')}"


class Client(_Base):
    """Blocking client; a context manager. `client.openai` is the `openai.OpenAI` underneath."""

    _openai_class = OpenAI
    _session_class = Session

    def _drive(self, steps: Steps) -> Any:
        """Each step's value is already there (blocking I/O): hand it straight back."""
        value = None
        while True:
            try:
                value = steps.send(value)
            except StopIteration as stop:
                return stop.value

    def _next_chunk(self, chunks: Any) -> Any:
        return next(chunks, None)

    def _run_tools(self, registry: ToolRegistry, calls: Sequence[ToolCall]) -> Any:
        return registry.run(calls)

    def chat_stream(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Iterator[StreamEvent]:
        """chat(), streamed: TextDelta and ToolCallEvent as they come, then one Done."""
        fold, raw = self._drive(self._send(messages, stream=True, **kwargs))
        with raw.parse() as chunks:
            for chunk in chunks:
                yield from fold.feed(chunk)
        yield Done(fold.result(raw.headers))

    def session(self, *args: Any, **kwargs: Any) -> Session:
        session = super().session(*args, **kwargs)
        return session if not session.pending else self._drive(session._ready())

    def close(self) -> None:
        self.openai.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: the same methods, awaitable. `client.openai` is the `openai.AsyncOpenAI`."""

    _openai_class = AsyncOpenAI
    _session_class = AsyncSession

    async def _drive(self, steps: Steps) -> Any:
        """Await each step's awaitable and send its value (or throw its error) back in."""
        value, error = None, None
        while True:
            try:
                awaitable = steps.throw(error) if error else steps.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value, error = await awaitable, None
            except Exception as exc:  # the steps may handle it (a session already gone, ...)
                value, error = None, exc

    def _next_chunk(self, chunks: Any) -> Any:
        return anext(chunks, None)

    def _run_tools(self, registry: ToolRegistry, calls: Sequence[ToolCall]) -> Any:
        return registry.arun(calls)

    async def chat_stream(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> AsyncIterator[StreamEvent]:
        fold, raw = await self._drive(self._send(messages, stream=True, **kwargs))
        async with raw.parse() as chunks:
            async for chunk in chunks:
                for event in fold.feed(chunk):
                    yield event
        yield Done(fold.result(raw.headers))

    async def aclose(self) -> None:
        await self.openai.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
