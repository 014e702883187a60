"""A scripted stand-in for the gateway, for fast SDK and example tests without the model.

`FakeGateway` speaks the gateway's wire format (chat completions, stream and not, with the same
chunk order, `usage.agentkv` and `x-agentkv-route` from kvstore.wire.RouteStats, and the OpenAI error envelope; /v1/sessions;
/v1/models). Its "model" is a rule: call a tool when tools are offered after a user message (the
named or the first one, arguments from the schema), otherwise answer with the tool results since
the last user message, or echo the user. Tests can queue exact replies or errors. Token counts are
a word count, and a turn that extends the previous one reports all of it as cached, like the real
ledger. Serve it in-process through `httpx.MockTransport` (`fake.transport()`) or on a loopback
port (`fake.serve()`) for clients that bring their own HTTP stack (openai, Agents SDK, LangChain).

The tests at the bottom check the fake against the real `openai` client: if they fail, the fake
has drifted from the wire format and every test built on it is suspect.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest

from kvstore.wire import ROUTE_HEADER, RouteStats

MODEL = "fake-smollm2"


@dataclass
class Reply:
    content: str | None = None
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeResponse:
    status: int
    headers: dict[str, str]
    chunks: list[bytes]  # one element for a plain body; SSE events otherwise


def envelope(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _tokens(value: Any) -> int:
    return len(json.dumps(value, sort_keys=True).split()) if value else 0


class FakeGateway:
    def __init__(self) -> None:
        self.queue: list[Reply | Failure] = []
        self.requests: list[dict[str, Any]] = []  # {"method", "path", "headers", "body"}
        self.sessions: dict[str, dict[str, Any]] = {}
        self._last: dict[str, tuple[list[Any], int]] = {}  # session -> (history incl. reply, tokens)
        self._lock = threading.Lock()

    # -- scripting ----------------------------------------------------------------------
    def reply(self, content: str | None = None, tool_calls: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        self.queue.append(Reply(content, tool_calls or []))

    def fail(self, status: int, message: str = "boom", type_: str = "server_error", code: str | None = None,
             headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.queue.append(Failure(status, envelope(message, type_, code), headers or {}))

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    # -- transport adapters -------------------------------------------------------------
    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content) if request.content else None
            out = self.handle(request.method, request.url.path, dict(request.headers), body)
            return httpx.Response(out.status, headers=out.headers, content=b"".join(out.chunks))

        return httpx.MockTransport(handler)

    def serve(self) -> FakeServer:
        return FakeServer(self)

    # -- the fake API -------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> FakeResponse:
        with self._lock:
            headers = {k.lower(): v for k, v in headers.items()}
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
            path = path.rstrip("/")
            if path == "/v1/models" and method == "GET":
                return _json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "agentkv"}]})
            if path == "/v1/sessions" and method == "POST":
                sid = (body or {}).get("id") or f"sess_{uuid.uuid4().hex[:12]}"
                return _json(200, self._session(sid, (body or {}).get("ttl_s")))
            if path == "/v1/sessions" and method == "GET":
                return _json(200, {"object": "list", "data": list(self.sessions.values())})
            if path.startswith("/v1/sessions/"):
                sid = path.removeprefix("/v1/sessions/")  # the whole rest, "/" included, as the gateway reads it
                if sid not in self.sessions:
                    return _json(404, envelope(f"session {sid!r} not found", "not_found_error", "session_not_found"))
                if method == "DELETE":
                    del self.sessions[sid]
                    return _json(200, {"id": sid, "deleted": True, "object": "session.deleted"})
                return _json(200, self.sessions[sid])
            if path == "/v1/chat/completions" and method == "POST":
                return self._chat(headers, body)
            return _json(404, envelope(f"no route {method} {path}", "not_found_error", "not_found"))

    def _session(self, sid: str, ttl_s: float | None = None) -> dict[str, Any]:
        now = time.time()
        ttl = ttl_s or 300.0
        record = self.sessions.setdefault(sid, {
            "id": sid, "tenant": "local", "created_at": now, "last_used_at": now, "expires_at": now + ttl, "ttl_s": ttl,
            "turns": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "prefilled_tokens": 0,
            "transferred_tokens": 0, "transferred_blocks": 0, "node": None, "object": "session",
        })  # fmt: skip
        return record

    def _decide(self, body: dict[str, Any]) -> Reply | Failure:
        if self.queue:
            return self.queue.pop(0)
        messages, tools, choice = body["messages"], body.get("tools") or [], body.get("tool_choice", "auto")
        last = messages[-1]["role"] if messages else "user"
        forced = choice == "required" or isinstance(choice, dict)
        if tools and choice != "none" and (forced or last == "user"):
            named = choice["function"]["name"] if isinstance(choice, dict) else None
            user_text = next((str(m.get("content")) for m in reversed(messages) if m["role"] == "user"), "")
            fn = next((t["function"] for t in tools if t["function"]["name"] == named), None) if named else None
            fn = fn or next((t["function"] for t in tools if t["function"]["name"] in user_text), tools[0]["function"])
            return Reply(None, [(fn["name"], _example_args(fn.get("parameters") or {}))])
        since_user: list[str] = []
        for m in reversed(messages):
            if m["role"] == "user":
                break
            if m["role"] == "tool":
                since_user.insert(0, str(m.get("content")))
        if since_user:
            return Reply("Result: " + "; ".join(since_user))
        user_text = next((str(m.get("content")) for m in reversed(messages) if m["role"] == "user"), "")
        return Reply(f"Echo: {user_text}")

    def _chat(self, headers: dict[str, str], body: dict[str, Any]) -> FakeResponse:
        if not isinstance(body, dict) or not body.get("messages"):
            return _json(400, envelope("messages: field required", "invalid_request_error", "invalid_request", "messages"))
        decision = self._decide(body)
        if isinstance(decision, Failure):
            return _json(decision.status, decision.body, decision.headers)
        calls = [{"id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                  "function": {"name": name, "arguments": json.dumps(args)}} for name, args in decision.tool_calls]  # fmt: skip
        message: dict[str, Any] = {"role": "assistant", "content": decision.content}
        if calls:
            message["tool_calls"] = calls
        sid = headers.get("x-session-id") or body.get("prompt_cache_key") or body.get("user")
        history = [_strip_none(x) for x in (body.get("tools"), *body["messages"])]
        prompt = sum(_tokens(x) for x in history)
        completion = max(1, _tokens(decision.content) + _tokens(calls))
        cached = 0
        if sid:
            prev, prev_tokens = self._last.get(sid, ([], 0))
            if prev and history[: len(prev)] == prev:
                cached = prev_tokens
            self._last[sid] = (history + [_strip_none(message)], prompt + completion)
            record = self._session(sid)
            for key, value in (("turns", 1), ("prompt_tokens", prompt), ("completion_tokens", completion),
                               ("cached_tokens", cached), ("prefilled_tokens", prompt - cached)):  # fmt: skip
                record[key] += value
            record["node"] = "fake-decode"
        stats = RouteStats(decode_node="fake-decode", session_id=sid, prompt_tokens=prompt, cached_tokens=cached,
                           prefilled_tokens=prompt - cached)  # fmt: skip
        usage = {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "agentkv": msgspec.to_builtins(stats),
        }  # fmt: skip
        planned = msgspec.structs.replace(stats, source="planned")  # a stream's headers leave before decoding
        route = {ROUTE_HEADER: (planned if body.get("stream") else stats).to_header()}
        if sid:
            route["x-session-id"] = sid
        finish = "tool_calls" if calls else "stop"
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": body.get("model", MODEL)}
        if not body.get("stream"):
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            return _json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage}, route)

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n".encode()

        def delta(d: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return event([{"index": 0, "delta": d, "finish_reason": finish_reason, "logprobs": None}])

        chunks = [delta({"role": "assistant", "content": ""})]
        if decision.content:
            half = len(decision.content) // 2
            chunks += [delta({"content": decision.content[:half]}), delta({"content": decision.content[half:]})]
        for i, c in enumerate(calls):
            args = c["function"]["arguments"]
            chunks.append(delta({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                                 "function": {"name": c["function"]["name"], "arguments": ""}}]}))  # fmt: skip
            for part in (args[: len(args) // 2], args[len(args) // 2 :]):
                chunks.append(delta({"tool_calls": [{"index": i, "function": {"arguments": part}}]}))
        chunks.append(delta({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(event([], usage=usage))
        chunks.append(b"data: [DONE]\n\n")
        return FakeResponse(200, {"content-type": "text/event-stream", **route}, chunks)


def _example_args(schema: dict[str, Any]) -> dict[str, Any]:
    samples = {"string": "Paris", "integer": 2, "number": 1.5, "boolean": True, "array": [], "object": {}}
    props = schema.get("properties") or {}
    return {name: samples.get((props.get(name) or {}).get("type", "string"), "x") for name in schema.get("required", [])}


def _strip_none(value: Any) -> Any:
    """Compare histories the way a ledger would: an absent field and a null one are the same."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> FakeResponse:
    return FakeResponse(status, {"content-type": "application/json", **(headers or {})}, [json.dumps(body).encode()])


class FakeServer:
    """The fake on a loopback port (a thread), for clients with their own HTTP stack."""

    def __init__(self, fake: FakeGateway) -> None:
        self.fake = fake

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                out = fake.handle(self.command, urllib.parse.unquote(self.path.split("?")[0]), dict(self.headers), body)
                self.send_response(out.status)
                for k, v in out.headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(sum(map(len, out.chunks))))
                self.end_headers()
                for chunk in out.chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-gateway", daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def fake_url(fake: FakeGateway) -> Iterator[str]:
    with fake.serve() as server:
        yield server.url


# ------------------------------------------------------------------ the fake against the real client


def test_fake_speaks_the_openai_client_wire_format(fake_url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{fake_url}/v1", api_key="x", default_headers={"X-Session-Id": "s1"})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    call = first.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    with client.chat.completions.stream(model=MODEL, messages=messages, tools=tools, stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Result: sunny"
    assert final.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_fake_streams_tool_calls_as_openai_deltas(fake_url):
    from openai import OpenAI

    fake_tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}} for n in ("a", "b")]
    client = OpenAI(base_url=f"{fake_url}/v1", api_key="x")
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "go"}], tools=fake_tools) as stream:
        final = stream.get_final_completion()
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["a"]
    assert final.choices[0].finish_reason == "tool_calls"
