"""HTTP clients for an agentkv gateway (or any OpenAI-compatible server): `Client` and `AsyncClient`.

Both speak the same OpenAI wire format and differ only in I/O; everything else (request bodies,
response parsing, per-turn stats, retry policy, error types) is shared below so the two cannot
drift. Retries cover what is safe to retry: a refused connection and a 429/5xx answer, waiting as
long as the server's `retry-after` asks. A read timeout is not retried: the gateway may already be
running the turn, and a second copy would be billed to the session twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
from httpx_sse import SSEError, aconnect_sse, connect_sse

from agentkv.tools import Tool, ToolCall, as_tool

if TYPE_CHECKING:
    from agentkv.session import AsyncSession, Session

__all__ = [
    "AsyncClient", "Client", "ChatResult", "TurnStats", "SessionInfo", "TextDelta", "ToolCallEvent", "Done",
    "AgentKVError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
    "ContextLengthExceededError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
    "SessionNotFoundError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
]  # fmt: skip

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SESSION_HEADER = "X-Session-Id"
ROUTE_HEADER = "x-agentkv-route"
Message = dict[str, Any]
ToolLike = Tool | Callable[..., Any] | Mapping[str, Any]

# ------------------------------------------------------------------------------------------ errors


class AgentKVError(Exception):
    """Base of every error this SDK raises."""


class APIConnectionError(AgentKVError):
    """The gateway could not be reached (or the connection broke mid-response)."""


class APITimeoutError(APIConnectionError):
    """No answer within the client's timeout."""


class APIStatusError(AgentKVError):
    """The gateway answered with an error: the OpenAI envelope's fields, plus the HTTP status."""

    def __init__(self, message: str, *, status_code: int, type: str | None = None, code: str | None = None,
                 param: str | None = None, body: Any = None, headers: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.message = message
        self.status_code = status_code
        self.type = type
        self.code = code
        self.param = param
        self.body = body
        self.headers = dict(headers or {})
        detail = "/".join(x for x in (type, code) if x)
        super().__init__(f"{message} (HTTP {status_code}{', ' + detail if detail else ''})")


class BadRequestError(APIStatusError):
    """400: the request is wrong; the message and `param` say what to change."""


class ContextLengthExceededError(BadRequestError):
    """400 context_length_exceeded: shorten the history or lower max_tokens."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key (pass api_key= or set AGENTKV_API_KEY)."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: unknown route, model or session."""


class SessionNotFoundError(NotFoundError):
    """404 session_not_found: expired (TTL), deleted, or owned by another API key."""


class RateLimitError(APIStatusError):
    """429, after the retries ran out."""


class InternalServerError(APIStatusError):
    """5xx, after the retries ran out."""


class ServiceUnavailableError(InternalServerError):
    """503: no live workers, misconfigured cluster or state store down."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    422: BadRequestError, 429: RateLimitError, 503: ServiceUnavailableError,
}  # fmt: skip
_BY_CODE: dict[str, type[APIStatusError]] = {
    "context_length_exceeded": ContextLengthExceededError,
    "session_not_found": SessionNotFoundError,
}
_STATUS_BY_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                   "not_found_error": 404, "rate_limit_error": 429, "service_unavailable_error": 503}  # fmt: skip


def error_from_body(status: int | None, body: Any, headers: Mapping[str, str] | None = None) -> APIStatusError:
    """The typed error for an OpenAI error envelope (or whatever else an error body holds)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, dict):
        text = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
        err = {"message": text[:500] or f"HTTP {status}"}
    etype, code = err.get("type"), err.get("code")
    status = status if status and status >= 400 else _STATUS_BY_TYPE.get(str(etype), 500)
    cls = _BY_CODE.get(str(code)) or _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    message = str(err.get("message") or f"HTTP {status}")
    if cls is AuthenticationError:
        message += " (pass api_key= to the client or set AGENTKV_API_KEY)"
    return cls(message, status_code=status, type=etype, code=None if code is None else str(code),
               param=err.get("param"), body=body, headers=headers)  # fmt: skip


def error_from_response(response: httpx.Response) -> APIStatusError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, response.headers)


# -------------------------------------------------------------------------------------------- data


@dataclass
class TurnStats:
    """One model call's accounting: the gateway's usage, its route header, and client-side timing.

    `cached_tokens` were found in KV caches, `prefilled_tokens` computed for this turn,
    `transferred_tokens` moved prefill -> decode node. `ttft_s` (time to first streamed chunk) is
    measured here, so it is None for a non-streamed call.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int | None = None  # None: the server did not say
    transferred_tokens: int = 0
    transferred_blocks: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    decode_node: str | None = None
    prefill_node: str | None = None
    mode: str | None = None  # router mode: exact | degraded
    route: dict[str, Any] = field(default_factory=dict)  # the parsed x-agentkv-route header

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prefilled_tokens, "transferred_tokens": self.transferred_tokens,
            "completion_tokens": self.completion_tokens, "ttft_s": self.ttft_s, "latency_s": self.latency_s,
        }  # fmt: skip


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
    def message(self) -> Message:
        msg: Message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


@dataclass(frozen=True)
class TextDelta:
    """A piece of assistant text, as it streams."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call whose name and arguments are complete."""

    call: ToolCall


@dataclass(frozen=True)
class Done:
    """The end of the stream: the whole turn, with its stats."""

    result: ChatResult


StreamEvent = TextDelta | ToolCallEvent | Done


class SessionInfo(msgspec.Struct, kw_only=True):
    """The gateway's session record (`/v1/sessions/{id}`); unknown fields are ignored."""

    id: str
    tenant: str | None = None
    created_at: float | None = None
    last_used_at: float | None = None
    expires_at: float | None = None
    ttl_s: float | None = None
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    transferred_tokens: int = 0
    transferred_blocks: int = 0
    node: str | None = None


# ------------------------------------------------------------------------------ shared mechanics


def parse_route_header(value: str | None) -> dict[str, Any]:
    """`x-agentkv-route` as a dict, whatever its shape: a JSON object, or `k=v` pairs separated by
    `;`, `,` or spaces. Numbers become ints/floats; anything unparseable is kept under "raw"."""
    if not value:
        return {}
    value = value.strip()
    if value.startswith("{"):
        try:
            parsed = json.loads(value)
            if isinstance(parsed, dict):
                return parsed
        except ValueError:
            pass
    out: dict[str, Any] = {}
    for part in value.replace(";", " ").replace(",", " ").split():
        key, sep, val = part.partition("=")
        if not sep:
            key, sep, val = part.partition(":")
        if sep and key:
            out[key.strip().lower().replace("-", "_")] = _number(val.strip())
    return out or {"raw": value}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def build_stats(usage: Mapping[str, Any] | None, headers: Mapping[str, str], latency_s: float, ttft_s: float | None) -> TurnStats:
    """Stats from `usage` (incl. its `agentkv` extension) with the route header as a fallback."""
    usage = usage or {}
    route = parse_route_header(headers.get(ROUTE_HEADER))
    ext = usage.get("agentkv") if isinstance(usage.get("agentkv"), dict) else {}
    details = usage.get("prompt_tokens_details") or {}

    def pick(*values: Any) -> int | None:
        return next((v for v in map(_int, values) if v is not None), None)

    prompt = pick(usage.get("prompt_tokens")) or 0
    cached = pick(details.get("cached_tokens"), route.get("cached_tokens"), route.get("cached")) or 0
    if ext:  # the actual accounting (fields at their default are omitted, so absent means 0)
        prefilled, transferred, blocks = (pick(ext.get(k)) or 0 for k in ("prefilled_tokens", "transferred_tokens", "transferred_blocks"))
    else:  # only the route header: in a stream it is sent before decoding, so these may be planned values
        prefilled = pick(route.get("prefilled_tokens"), route.get("prefilled"))
        transferred = pick(route.get("transferred_tokens")) or 0
        blocks = pick(route.get("transferred_blocks"), route.get("transfer_blocks"), route.get("blocks_transferred")) or 0
    return TurnStats(
        prompt_tokens=prompt,
        completion_tokens=pick(usage.get("completion_tokens")) or 0,
        cached_tokens=cached,
        prefilled_tokens=prefilled,
        transferred_tokens=transferred,
        transferred_blocks=blocks,
        ttft_s=ttft_s,
        latency_s=latency_s,
        decode_node=ext.get("decode_node") or _str(route.get("decode") or route.get("decode_node") or route.get("d")),
        prefill_node=ext.get("prefill_node") or _str(route.get("prefill") or route.get("prefill_node") or route.get("p")),
        mode=ext.get("mode") or _str(route.get("mode")),
        route=route,
    )


def _str(value: Any) -> str | None:
    return None if value in (None, "", "-", "none") else str(value)


def parse_completion(data: Mapping[str, Any], headers: Mapping[str, str], latency_s: float) -> ChatResult:
    choices = data.get("choices") or []
    if not choices:
        raise APIStatusError("the server's completion has no choices", status_code=502, body=data)
    choice = choices[0]
    msg = choice.get("message") or {}
    calls = [
        ToolCall(c.get("id") or f"call_{i}", (c.get("function") or {}).get("name", ""), _args_text((c.get("function") or {}).get("arguments")))
        for i, c in enumerate(msg.get("tool_calls") or [])
    ]
    return ChatResult(
        content=msg.get("content"), tool_calls=calls, finish_reason=choice.get("finish_reason"),
        stats=build_stats(data.get("usage"), headers, latency_s, None), id=data.get("id", ""), model=data.get("model", ""),
    )  # fmt: skip


def _args_text(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


class ChatStream:
    """Folds chat.completion.chunk objects into events and, at the end, a ChatResult."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.ttft_s: float | None = None
        self.headers: Mapping[str, str] = {}
        self.content: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.emitted: set[int] = set()
        self.finish_reason: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.id = ""
        self.model = ""

    def feed(self, chunk: Mapping[str, Any]) -> list[StreamEvent]:
        if "error" in chunk:
            raise error_from_body(None, chunk, self.headers)
        self.id = chunk.get("id") or self.id
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events: list[StreamEvent] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            if self.ttft_s is None:
                self.ttft_s = time.perf_counter() - self.started
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
                events.append(TextDelta(delta["content"]))
            for tc in delta.get("tool_calls") or []:
                index = tc.get("index", len(self.calls))
                if index not in self.calls:
                    events += self._flush(below=index)
                    self.calls[index] = {"id": "", "name": "", "arguments": ""}
                slot, fn = self.calls[index], tc.get("function") or {}
                slot["id"] = tc.get("id") or slot["id"]
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += _args_text(fn["arguments"]) if fn.get("arguments") is not None else ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                events += self._flush()
        return events

    def finish(self) -> ChatResult:
        self._flush()
        calls = [self._call(i) for i in sorted(self.calls)]
        stats = build_stats(self.usage, self.headers, time.perf_counter() - self.started, self.ttft_s)
        content = "".join(self.content) if self.content or not calls else None
        return ChatResult(content, calls, self.finish_reason, stats, self.id, self.model)

    def _call(self, index: int) -> ToolCall:
        slot = self.calls[index]
        return ToolCall(slot["id"] or f"call_{index}", slot["name"], slot["arguments"] or "{}")

    def _flush(self, below: int | None = None) -> list[StreamEvent]:
        ready = [i for i in sorted(self.calls) if i not in self.emitted and (below is None or i < below)]
        self.emitted.update(ready)
        return [ToolCallEvent(self._call(i)) for i in ready]


def _decode_sse(data: str) -> dict[str, Any] | None:
    """One SSE `data:` payload; None for the `[DONE]` sentinel."""
    if data.strip() == "[DONE]":
        return None
    try:
        value = json.loads(data)
    except ValueError:
        raise APIStatusError(f"the server sent a stream event that is not JSON: {data[:200]!r}", status_code=502) from None
    if not isinstance(value, dict):
        raise APIStatusError(f"the server sent a stream event that is not an object: {data[:200]!r}", status_code=502)
    return value


class _Config:
    """What both clients share: URLs, headers, request bodies and the retry policy."""

    RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str | None, api_key: str | None, model: str | None, timeout: float | httpx.Timeout,
                 connect_timeout: float, max_retries: int, max_retry_delay_s: float, headers: Mapping[str, str] | None) -> None:  # fmt: skip
        base = (base_url or os.environ.get("AGENTKV_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base  # accept OpenAI-style URLs too
        self.api_key = api_key if api_key is not None else os.environ.get("AGENTKV_API_KEY")
        self.model = model
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=connect_timeout)
        self.max_retries = max_retries
        self.max_retry_delay_s = max_retry_delay_s
        self.headers = {"user-agent": "agentkv-sdk", **(headers or {})}
        if self.api_key:
            self.headers["authorization"] = f"Bearer {self.api_key}"

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in self.RETRY_STATUSES:
                return None
            asked = _retry_after(response.headers)
            if asked is not None:
                return min(asked, self.max_retry_delay_s)
        return min(0.5 * 2**attempt, 8.0) * (0.75 + random.random() / 2)

    def connection_error(self, exc: httpx.TransportError) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"no answer from {self.base_url} within the timeout ({type(exc).__name__}); raise timeout=")
        return APIConnectionError(f"cannot reach the agentkv gateway at {self.base_url} ({exc}); is `agentkv up` running?")

    def chat_body(self, messages: Sequence[Message], model: str, *, tools: Iterable[ToolLike] | None, tool_choice: Any,
                  stream: bool, params: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
        body: dict[str, Any] = {"model": model, "messages": list(messages), **params}
        specs = [t if isinstance(t, Mapping) else as_tool(t).spec for t in tools or ()]
        if specs:
            body["tools"] = specs
        if tool_choice is not None:
            body["tool_choice"] = tool_choice_param(tool_choice)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True, **(params.get("stream_options") or {})}
        return body

    def request_headers(self, session_id: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if session_id:
            headers[SESSION_HEADER] = session_id
        return headers


def tool_choice_param(choice: Any) -> Any:
    """`"auto" | "none" | "required"`, a Tool, a tool name, or an OpenAI dict -> the wire value."""
    if isinstance(choice, Tool):
        choice = choice.name
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        return {"type": "function", "function": {"name": choice}}
    return choice


def _retry_after(headers: Mapping[str, str]) -> float | None:
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------------ Client


class Client:
    """Blocking client. `Client(base_url="http://127.0.0.1:8000", api_key=...)`; use as a context manager.

    `model` defaults to the first model the server lists. `transport` is for tests (httpx.MockTransport).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 timeout: float | httpx.Timeout = 300.0, connect_timeout: float = 5.0, max_retries: int = 2,
                 max_retry_delay_s: float = 30.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self._cfg = _Config(base_url, api_key, model, timeout, connect_timeout, max_retries, max_retry_delay_s, headers)
        self._http = httpx.Client(base_url=self._cfg.base_url, headers=self._cfg.headers, timeout=self._cfg.timeout, transport=transport)
        self._sleep = time.sleep

    @property
    def base_url(self) -> str:
        return self._cfg.base_url

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, method: str, path: str, json: Any, headers: Mapping[str, str] | None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=json, headers=headers)
            except httpx.TransportError as exc:
                delay = self._cfg.retry_delay(attempt, None) if isinstance(exc, httpx.ConnectError) else None
                if delay is None:
                    raise self._cfg.connection_error(exc) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = self._cfg.retry_delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            self._sleep(delay)
            attempt += 1

    def request(self, method: str, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        """One API call with retries; returns the decoded JSON body or raises a typed error."""
        response = self._send(method, path, json, headers)
        return response.json() if response.content else None

    def _sse(self, path: str, body: Any, headers: Mapping[str, str]) -> Iterator[tuple[httpx.Response, dict[str, Any]]]:
        attempt = 0
        while True:
            try:
                with connect_sse(self._http, "POST", path, json=body, headers=dict(headers)) as source:
                    response = source.response
                    if response.status_code < 400:
                        for sse in source.iter_sse():
                            data = _decode_sse(sse.data) if sse.data else {}
                            if data is None:
                                return
                            if data:
                                yield response, data
                        return
                    response.read()
                    delay = self._cfg.retry_delay(attempt, response)
                    if delay is None:
                        raise error_from_response(response)
            except httpx.TransportError as exc:
                delay = self._cfg.retry_delay(attempt, None) if isinstance(exc, httpx.ConnectError) else None
                if delay is None:
                    raise self._cfg.connection_error(exc) from exc
            except SSEError as exc:
                raise APIStatusError(f"expected an event stream from {path}: {exc}", status_code=502) from exc
            self._sleep(delay)
            attempt += 1

    # -- API --------------------------------------------------------------------------------
    def default_model(self) -> str:
        if self._cfg.model is None:
            ids = self.models()
            if not ids:
                raise ServiceUnavailableError("the server lists no models (are the workers up?)", status_code=503)
            self._cfg.model = ids[0]
        return self._cfg.model

    def models(self) -> list[str]:
        return [m["id"] for m in (self.request("GET", "/v1/models") or {}).get("data", [])]

    def chat(self, messages: Sequence[Message], *, tools: Iterable[ToolLike] | None = None, tool_choice: Any = None,
             session_id: str | None = None, model: str | None = None, headers: Mapping[str, str] | None = None,
             **params: Any) -> ChatResult:  # fmt: skip
        """One non-streamed chat completion. Extra keyword arguments go into the request body."""
        body = self._cfg.chat_body(messages, model or self.default_model(), tools=tools, tool_choice=tool_choice, stream=False, params=params)
        started = time.perf_counter()
        response = self._send("POST", "/v1/chat/completions", body, self._cfg.request_headers(session_id, headers))
        return parse_completion(response.json(), response.headers, time.perf_counter() - started)

    def chat_stream(self, messages: Sequence[Message], *, tools: Iterable[ToolLike] | None = None, tool_choice: Any = None,
                    session_id: str | None = None, model: str | None = None, headers: Mapping[str, str] | None = None,
                    **params: Any) -> Iterator[StreamEvent]:  # fmt: skip
        """A streamed chat completion: TextDelta and ToolCallEvent as they come, then one Done."""
        body = self._cfg.chat_body(messages, model or self.default_model(), tools=tools, tool_choice=tool_choice, stream=True, params=params)
        state = ChatStream(time.perf_counter())
        for response, chunk in self._sse("/v1/chat/completions", body, self._cfg.request_headers(session_id, headers)):
            state.headers = response.headers
            yield from state.feed(chunk)
        yield Done(state.finish())

    def create_session(self, id: str | None = None, *, ttl_s: float | None = None) -> SessionInfo:
        body = {k: v for k, v in {"id": id, "ttl_s": ttl_s}.items() if v is not None}
        return msgspec.convert(self.request("POST", "/v1/sessions", json=body), SessionInfo)

    def get_session(self, id: str) -> SessionInfo:
        return msgspec.convert(self.request("GET", f"/v1/sessions/{id}"), SessionInfo)

    def list_sessions(self) -> list[SessionInfo]:
        return msgspec.convert((self.request("GET", "/v1/sessions") or {}).get("data", []), list[SessionInfo])

    def delete_session(self, id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{id}")

    def session(self, id: str | None = None, *, system: str | None = None, tools: Iterable[Tool | Callable[..., Any]] = (),
                ttl_s: float | None = None, create: bool = True, **defaults: Any) -> Session:  # fmt: skip
        """A server-side session (created now unless create=False) that keeps its own history."""
        from agentkv.session import Session

        return Session(self, id, system=system, tools=tools, ttl_s=ttl_s, create=create, **defaults)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------- AsyncClient


class AsyncClient:
    """The asyncio twin of Client: same arguments, same methods, awaitable."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 timeout: float | httpx.Timeout = 300.0, connect_timeout: float = 5.0, max_retries: int = 2,
                 max_retry_delay_s: float = 30.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self._cfg = _Config(base_url, api_key, model, timeout, connect_timeout, max_retries, max_retry_delay_s, headers)
        self._http = httpx.AsyncClient(base_url=self._cfg.base_url, headers=self._cfg.headers, timeout=self._cfg.timeout, transport=transport)
        self._sleep = asyncio.sleep

    @property
    def base_url(self) -> str:
        return self._cfg.base_url

    async def _send(self, method: str, path: str, json: Any, headers: Mapping[str, str] | None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=json, headers=headers)
            except httpx.TransportError as exc:
                delay = self._cfg.retry_delay(attempt, None) if isinstance(exc, httpx.ConnectError) else None
                if delay is None:
                    raise self._cfg.connection_error(exc) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = self._cfg.retry_delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            await self._sleep(delay)
            attempt += 1

    async def request(self, method: str, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        response = await self._send(method, path, json, headers)
        return response.json() if response.content else None

    async def _sse(self, path: str, body: Any, headers: Mapping[str, str]) -> AsyncIterator[tuple[httpx.Response, dict[str, Any]]]:
        attempt = 0
        while True:
            try:
                async with aconnect_sse(self._http, "POST", path, json=body, headers=dict(headers)) as source:
                    response = source.response
                    if response.status_code < 400:
                        async for sse in source.aiter_sse():
                            data = _decode_sse(sse.data) if sse.data else {}
                            if data is None:
                                return
                            if data:
                                yield response, data
                        return
                    await response.aread()
                    delay = self._cfg.retry_delay(attempt, response)
                    if delay is None:
                        raise error_from_response(response)
            except httpx.TransportError as exc:
                delay = self._cfg.retry_delay(attempt, None) if isinstance(exc, httpx.ConnectError) else None
                if delay is None:
                    raise self._cfg.connection_error(exc) from exc
            except SSEError as exc:
                raise APIStatusError(f"expected an event stream from {path}: {exc}", status_code=502) from exc
            await self._sleep(delay)
            attempt += 1

    async def default_model(self) -> str:
        if self._cfg.model is None:
            ids = await self.models()
            if not ids:
                raise ServiceUnavailableError("the server lists no models (are the workers up?)", status_code=503)
            self._cfg.model = ids[0]
        return self._cfg.model

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self.request("GET", "/v1/models") or {}).get("data", [])]

    async def chat(self, messages: Sequence[Message], *, tools: Iterable[ToolLike] | None = None, tool_choice: Any = None,
                   session_id: str | None = None, model: str | None = None, headers: Mapping[str, str] | None = None,
                   **params: Any) -> ChatResult:  # fmt: skip
        body = self._cfg.chat_body(messages, model or await self.default_model(), tools=tools, tool_choice=tool_choice, stream=False, params=params)
        started = time.perf_counter()
        response = await self._send("POST", "/v1/chat/completions", body, self._cfg.request_headers(session_id, headers))
        return parse_completion(response.json(), response.headers, time.perf_counter() - started)

    async def chat_stream(self, messages: Sequence[Message], *, tools: Iterable[ToolLike] | None = None, tool_choice: Any = None,
                          session_id: str | None = None, model: str | None = None, headers: Mapping[str, str] | None = None,
                          **params: Any) -> AsyncIterator[StreamEvent]:  # fmt: skip
        body = self._cfg.chat_body(messages, model or await self.default_model(), tools=tools, tool_choice=tool_choice, stream=True, params=params)
        state = ChatStream(time.perf_counter())
        async for response, chunk in self._sse("/v1/chat/completions", body, self._cfg.request_headers(session_id, headers)):
            state.headers = response.headers
            for event in state.feed(chunk):
                yield event
        yield Done(state.finish())

    async def create_session(self, id: str | None = None, *, ttl_s: float | None = None) -> SessionInfo:
        body = {k: v for k, v in {"id": id, "ttl_s": ttl_s}.items() if v is not None}
        return msgspec.convert(await self.request("POST", "/v1/sessions", json=body), SessionInfo)

    async def get_session(self, id: str) -> SessionInfo:
        return msgspec.convert(await self.request("GET", f"/v1/sessions/{id}"), SessionInfo)

    async def list_sessions(self) -> list[SessionInfo]:
        return msgspec.convert((await self.request("GET", "/v1/sessions") or {}).get("data", []), list[SessionInfo])

    async def delete_session(self, id: str) -> None:
        await self.request("DELETE", f"/v1/sessions/{id}")

    def session(self, id: str | None = None, *, system: str | None = None, tools: Iterable[Tool | Callable[..., Any]] = (),
                ttl_s: float | None = None, create: bool = True, **defaults: Any) -> AsyncSession:  # fmt: skip
        """`await client.session(...)` or `async with client.session(...) as s:`; created on the
        server before its first use unless create=False."""
        from agentkv.session import AsyncSession

        return AsyncSession(self, id, system=system, tools=tools, ttl_s=ttl_s, create=create, **defaults)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
