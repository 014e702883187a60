"""The SDK against a scripted gateway (tests/test_sdk_fakes.py): no model, milliseconds per test.

The same behaviours against the real stack are in tests/test_sdk_stack.py.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

import httpx
import openai
import pytest
from test_sdk_fakes import MODEL, FakeGateway, envelope, fake  # noqa: F401 (fixture)

from agentkv import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)
from agentkv.client import AsyncClient, Client, Done, TextDelta, ToolCallEvent
from agentkv.tools import ToolCall, ToolRegistry, tool

# --------------------------------------------------------------------------------------- tools


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


@dataclass
class Point:
    x: float
    y: float


@tool
def forecast(city: str, days: int = 1, unit: Unit = Unit.C, detail: Literal["short", "long"] = "short",
             tags: list[str] | None = None) -> dict:  # fmt: skip
    """Weather forecast for a city.

    Uses the fake weather service.

    Args:
        city: City name, e.g. Paris.
        days: How many days
            ahead (1-7).
        unit: Temperature unit.
    """
    return {"city": city, "days": days, "unit": unit.value, "detail": detail, "tags": tags}


def test_tool_schema_comes_from_type_hints_and_docstring():
    fn = forecast.spec["function"]
    assert fn["name"] == "forecast"
    assert fn["description"] == "Weather forecast for a city.\n\nUses the fake weather service."
    params = fn["parameters"]
    assert params["type"] == "object" and params["required"] == ["city"]
    props = params["properties"]
    assert props["city"] == {"type": "string", "description": "City name, e.g. Paris."}
    assert props["days"]["type"] == "integer" and props["days"]["description"] == "How many days ahead (1-7)."
    assert sorted(props["detail"]["enum"]) == ["long", "short"]
    assert "$defs" in params and params["$defs"]["Unit"]["enum"] == ["celsius", "fahrenheit"]  # nested types keep refs
    assert forecast("Oslo") == {"city": "Oslo", "days": 1, "unit": "celsius", "detail": "short", "tags": None}  # still callable


def test_tool_arguments_are_validated_and_coerced_like_json():
    assert forecast.bind('{"city": "Rome", "days": "3", "unit": "fahrenheit", "junk": 1}') == {
        "city": "Rome", "days": 3, "unit": Unit.F, "detail": "short", "tags": None}  # fmt: skip
    results = ToolRegistry([forecast]).run([
        ToolCall("1", "forecast", '{"days": 2}'),
        ToolCall("2", "forecast", "not json"),
        ToolCall("3", "nowcast", "{}"),
    ])  # fmt: skip
    assert all(r.is_error for r in results)
    assert "missing required field `city`" in results[0].content
    assert "not valid JSON" in results[1].content
    assert "unknown tool 'nowcast' (available: forecast)" in results[2].content


def test_tool_with_named_options_and_struct_parameter():
    @tool(name="dist", description="Distance between two points.")
    def distance(a: Point, b: Point) -> float:
        return ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5

    assert distance.name == "dist" and distance.description == "Distance between two points."
    assert distance.parameters["properties"]["a"] == {"$ref": "#/$defs/Point"}
    [result] = ToolRegistry([distance]).run([ToolCall("1", "dist", '{"a": {"x": 0, "y": 0}, "b": {"x": 3, "y": 4}}')])
    assert (result.is_error, result.content, result.value) == (False, "5.0", 5.0)


def test_tool_refuses_signatures_a_model_cannot_call():
    def varargs(*args: int) -> None:
        """Takes anything."""

    with pytest.raises(TypeError, match=r"\*args is not supported"):
        tool(varargs)
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        tool(name="bad name")(lambda: None)


def test_raising_tool_becomes_an_error_result_not_a_crash():
    @tool
    def explode(reason: str) -> str:
        """Always fails."""
        raise RuntimeError(f"disk on fire: {reason}")

    [result] = ToolRegistry([explode]).run([ToolCall("c1", "explode", '{"reason": "test"}')])
    assert result.is_error and result.content == "Error: RuntimeError: disk on fire: test"
    assert result.to_message() == {"role": "tool", "tool_call_id": "c1", "content": "Error: RuntimeError: disk on fire: test"}


def _sleepers():
    @tool
    def nap(seconds: float) -> str:
        """Sleep (sync)."""
        time.sleep(seconds)
        return threading.current_thread().name

    @tool
    async def anap(seconds: float) -> str:
        """Sleep (async)."""
        await asyncio.sleep(seconds)
        return "async"

    return ToolRegistry([nap, anap])


def test_sync_registry_runs_parallel_calls_concurrently():
    calls = [ToolCall("1", "nap", '{"seconds": 0.4}'), ToolCall("2", "anap", '{"seconds": 0.4}'), ToolCall("3", "nap", '{"seconds": 0.4}')]
    start = time.perf_counter()
    results = _sleepers().run(calls)
    elapsed = time.perf_counter() - start
    assert [r.is_error for r in results] == [False, False, False]
    assert [r.call.id for r in results] == ["1", "2", "3"]  # results keep the calls' order
    assert elapsed < 0.8, f"three 0.4 s calls took {elapsed:.2f} s: not concurrent"


def test_async_registry_runs_sync_and_async_calls_concurrently():
    calls = [ToolCall("1", "nap", '{"seconds": 0.4}'), ToolCall("2", "anap", '{"seconds": 0.4}')]

    async def go():
        start = time.perf_counter()
        results = await _sleepers().arun(calls)
        return results, time.perf_counter() - start

    results, elapsed = asyncio.run(go())
    assert [r.content for r in results][1] == "async" and not results[0].is_error
    assert elapsed < 0.7, f"two 0.4 s calls took {elapsed:.2f} s: not concurrent"


# -------------------------------------------------------------------------------------- client


def make_client(fake: FakeGateway, **kwargs) -> Client:
    return Client("http://gw.test", http_client=httpx.Client(transport=fake.transport()), **kwargs)


def make_async_client(fake: FakeGateway, **kwargs) -> AsyncClient:
    return AsyncClient("http://gw.test", http_client=httpx.AsyncClient(transport=fake.transport()), **kwargs)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The waits openai's retry loop chose, recorded instead of slept."""
    waits: list[float] = []
    choose = openai._base_client.BaseClient._calculate_retry_timeout

    def record(self, *args, **kwargs) -> float:
        waits.append(choose(self, *args, **kwargs))
        return 0.0

    monkeypatch.setattr(openai._base_client.BaseClient, "_calculate_retry_timeout", record)
    return waits


def test_chat_returns_content_usage_and_route_stats(fake):
    fake.reply("hello there")
    with make_client(fake, api_key="k-123") as client:
        result = client.chat([{"role": "user", "content": "hi"}], session_id="s1", max_tokens=5)
    req = fake.chat_requests()[0]
    assert req["body"]["model"] == MODEL and req["body"]["max_tokens"] == 5  # default model from /v1/models
    assert req["headers"]["authorization"] == "Bearer k-123" and req["headers"]["x-session-id"] == "s1"
    assert result.content == "hello there" and result.tool_calls == [] and result.finish_reason == "stop"
    s = result.stats
    assert s.prompt_tokens > 0 and s.cached_tokens == 0 and s.prefilled_tokens == s.prompt_tokens
    assert (s.decode_node, s.prefill_node, s.mode, s.ttft_s, s.session_id) == ("fake-decode", None, "exact", None, "s1")
    assert s.transferred_blocks == 0 and s.source == "actual" and s.latency_s > 0


def test_chat_stream_yields_text_then_tool_calls_then_done(fake):
    fake.reply("let me check", tool_calls=[("forecast", {"city": "Oslo"}), ("forecast", {"city": "Rome"})])
    with make_client(fake) as client:
        events = list(client.chat_stream([{"role": "user", "content": "weather?"}], tools=[forecast]))
    body = fake.chat_requests()[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tools"] == [forecast.spec]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    assert text == "let me check" and [c.args for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert isinstance(events[-1], Done) and events[-1].result.finish_reason == "tool_calls"
    result = events[-1].result
    assert result.tool_calls == calls and result.stats.ttft_s is not None and result.stats.prompt_tokens > 0
    assert result.message["tool_calls"][1] == calls[1].to_openai()


@pytest.mark.parametrize(
    ("status", "type_", "code", "error"),
    [
        (400, "invalid_request_error", "context_length_exceeded", BadRequestError),
        (400, "invalid_request_error", "invalid_request", BadRequestError),
        (401, "authentication_error", "invalid_api_key", AuthenticationError),
        (404, "not_found_error", "session_not_found", NotFoundError),
    ],
)
def test_error_envelope_becomes_a_typed_error(fake, sleeps, status, type_, code, error):
    fake.fail(status, "nope", type_, code)
    with make_client(fake) as client, pytest.raises(error) as info:
        client.chat([{"role": "user", "content": "hi"}], model="m")
    assert (info.value.status_code, info.value.type, info.value.code) == (status, type_, code)
    assert "nope" in info.value.message and sleeps == []  # 4xx are not retried


def test_429_is_retried_after_the_servers_retry_after(fake, sleeps):
    fake.fail(429, "slow down", "rate_limit_error", headers={"retry-after": "1.5"})
    fake.fail(503, "busy", "service_unavailable_error", headers={"retry-after-ms": "20"})
    fake.reply("ok")
    with make_client(fake) as client:
        assert client.chat([{"role": "user", "content": "hi"}], model="m").content == "ok"
    assert sleeps == [1.5, 0.02]


def test_5xx_retries_give_up_with_a_typed_error(fake, sleeps):
    for _ in range(3):
        fake.fail(502, "worker gone", "server_error", "upstream_error")
    with make_client(fake, max_retries=2) as client, pytest.raises(InternalServerError, match="worker gone"):
        client.chat([{"role": "user", "content": "hi"}], model="m")
    assert len(sleeps) == 2 and len(fake.chat_requests()) == 3


def test_rate_limit_error_after_retries_run_out(fake):
    fake.fail(429, "slow", "rate_limit_error", headers={"retry-after": "0"})
    with make_client(fake, max_retries=0) as client, pytest.raises(RateLimitError):
        client.chat([{"role": "user", "content": "hi"}], model="m")


def test_unreachable_gateway_is_retried_then_raises_a_connection_error(sleeps):
    attempts = []

    def refuse(request):
        attempts.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    client = Client("http://127.0.0.1:9", http_client=httpx.Client(transport=httpx.MockTransport(refuse)), max_retries=1)
    with pytest.raises(APIConnectionError):
        client.list_sessions()
    assert len(attempts) == 2 and len(sleeps) == 1


def test_error_inside_a_stream_raises_the_typed_error():
    def handler(request):
        body = b'data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        body += b"data: " + json.dumps(envelope("worker died", "server_error", "upstream_error")).encode() + b"\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = Client("http://gw.test", model="m", http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(APIError, match="worker died") as info:
        list(client.chat_stream([{"role": "user", "content": "hi"}]))
    assert info.value.code == "upstream_error" and info.value.type == "server_error"


def test_base_url_may_be_given_openai_style():
    client = Client("http://h:1/v1/")
    assert client.base_url == "http://h:1" and str(client.openai.base_url) == "http://h:1/v1/"


def test_a_stream_without_usage_takes_its_stats_from_the_route_header(fake):
    fake.reply("no usage here")
    with make_client(fake) as client:
        [*_, done] = client.chat_stream([{"role": "user", "content": "hi"}], session_id="s 1", stream_options={"include_usage": False})
    s = done.result.stats
    assert (s.source, s.decode_node, s.session_id, s.prompt_tokens, s.completion_tokens) == ("planned", "fake-decode", "s 1", 4, 0)
    assert s.ttft_s is not None and done.result.content == "no usage here"


def test_async_client_streams_and_retries(fake, sleeps):
    fake.fail(500, "flaky")
    fake.reply("async hello")

    async def go():
        async with make_async_client(fake) as client:
            return [e async for e in client.chat_stream([{"role": "user", "content": "hi"}])]

    events = asyncio.run(go())
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "async hello"
    assert isinstance(events[-1], Done) and len(fake.chat_requests()) == 2 and len(sleeps) == 1


def test_non_json_error_body_still_raises_a_status_error():
    transport = httpx.MockTransport(lambda r: httpx.Response(418, text="teapot"))
    client = Client("http://gw.test", model="m", http_client=httpx.Client(transport=transport))
    with pytest.raises(APIStatusError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert info.value.status_code == 418 and info.value.body == "teapot"


# ------------------------------------------------------------------------------------- session


def test_session_is_created_on_the_server_and_names_every_request(fake):
    with make_client(fake) as client, client.session(system="You are terse.", ttl_s=60) as session:
        assert session.id in fake.sessions and fake.sessions[session.id]["ttl_s"] == 60
        session.chat("hi")
        session.chat("again")
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
        assert {r["headers"]["x-session-id"] for r in fake.chat_requests()} == {session.id}
        assert session.info().turns == 2
        sid = session.id
    assert sid not in fake.sessions  # deleted on exit (its pinned blocks are released)


def test_run_executes_the_requested_tool_and_answers_with_its_result(fake):
    calls = []

    @tool
    def get_weather(city: str) -> str:
        """Current weather."""
        calls.append(city)
        return f"{city}: 21 C and sunny"

    with make_client(fake) as client:
        session = client.session()
        result = session.run("What's the weather in Paris?", tools=[get_weather])
    assert calls == ["Paris"] and result.finished and result.steps == 2
    assert result.content == "Result: Paris: 21 C and sunny"
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    assert session.messages[2]["tool_call_id"] == session.messages[1]["tool_calls"][0]["id"]
    first, second = result.turns
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens  # the fake's ledger: exact extension


def test_run_forces_the_first_call_and_forbids_tools_on_the_last_step(fake):
    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return "v"

    with make_client(fake) as client:
        client.session().run("go", tools=[lookup], tool_choice="lookup", max_steps=2)
    choices = [r["body"]["tool_choice"] for r in fake.chat_requests()]
    assert choices == [{"type": "function", "function": {"name": "lookup"}}, "none"]


def test_run_stops_at_max_steps_when_the_model_keeps_calling(fake):
    for _ in range(3):
        fake.reply(None, [("lookup", {"key": "k"})])

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return "v"

    with make_client(fake) as client:
        result = client.session().run("go", tools=[lookup], max_steps=3)
    assert not result.finished and result.steps == 3 and len(result.tool_results) == 3


def test_run_executes_parallel_calls_concurrently(fake):
    fake.reply(None, [("slow_a", {}), ("slow_b", {})])

    @tool
    def slow_a() -> str:
        """Half a second of work."""
        time.sleep(0.5)
        return "a done"

    @tool
    def slow_b() -> str:
        """Half a second of work."""
        time.sleep(0.5)
        return "b done"

    with make_client(fake) as client:
        start = time.perf_counter()
        result = client.session().run("do both", tools=[slow_a, slow_b])
        elapsed = time.perf_counter() - start
    assert result.content == "Result: a done; b done"
    assert elapsed < 0.9, f"two 0.5 s tools took {elapsed:.2f} s: not concurrent"


def test_raising_tool_becomes_a_tool_error_message_and_the_run_goes_on(fake):
    @tool
    def flaky(city: str) -> str:
        """Fails."""
        raise ConnectionError("weather service down")

    with make_client(fake) as client:
        session = client.session()
        result = session.run("weather in Paris?", tools=[flaky])
    assert result.finished and result.tool_results[0].is_error
    tool_msg = next(m for m in session.messages if m["role"] == "tool")
    assert tool_msg["content"] == "Error: ConnectionError: weather service down"
    assert result.content == "Result: Error: ConnectionError: weather service down"


def test_session_stream_yields_events_and_keeps_the_reply(fake):
    fake.reply("streamed answer")
    with make_client(fake) as client:
        session = client.session(create=False)
        events = list(session.stream("hi"))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "streamed answer"
    assert session.messages[-1] == {"role": "assistant", "content": "streamed answer"}
    assert session.turns[-1].ttft_s is not None and session.id.startswith("sess_")


def test_async_session_runs_async_tools_concurrently(fake):
    fake.reply(None, [("wait_a", {}), ("wait_b", {})])

    @tool
    async def wait_a() -> str:
        """Async work."""
        await asyncio.sleep(0.5)
        return "A"

    @tool
    def wait_b() -> str:
        """Sync work, in a thread."""
        time.sleep(0.5)
        return "B"

    async def go():
        async with make_async_client(fake) as client:
            async with client.session(tools=[wait_a, wait_b]) as session:
                start = time.perf_counter()
                result = await session.run("both")
                return result, time.perf_counter() - start, session.id

    result, elapsed, sid = asyncio.run(go())
    assert result.content == "Result: A; B" and elapsed < 0.9
    assert sid not in fake.sessions


def test_async_session_is_created_when_awaited_or_before_its_first_call(fake):
    async def go():
        async with make_async_client(fake) as client:
            awaited = await client.session(ttl_s=30)
            lazy = client.session()
            assert lazy.id is None
            await lazy.chat("hi")
            return awaited.id, lazy.id

    awaited_id, lazy_id = asyncio.run(go())
    assert fake.sessions[awaited_id]["ttl_s"] == 30 and fake.sessions[lazy_id]["turns"] == 1
    creates = [r for r in fake.requests if r["path"] == "/v1/sessions" and r["method"] == "POST"]
    assert len(creates) == 2 and fake.chat_requests()[0]["headers"]["x-session-id"] == lazy_id


def test_deleting_a_session_that_is_already_gone_is_fine(fake):
    """The 404 of a second delete reaches the session's steps (thrown in by AsyncClient's driver)."""
    with make_client(fake) as client:
        session = client.session()
        session.delete()
        session.delete()
        assert client.list_sessions().data == []

    async def go():
        async with make_async_client(fake) as client:
            session = await client.session()
            await session.delete()
            await session.delete()

    asyncio.run(go())
    assert [r["method"] for r in fake.requests if r["path"].startswith("/v1/sessions/")] == ["DELETE"] * 4


# ------------------------------------------------------------------- odd input (review 2026-12-03)


def test_a_failed_turn_leaves_the_history_as_it_was(fake):
    """The user message joins the history with the reply: a retry after an error sends it once."""
    fake.fail(500, "boom")
    fake.reply("hi")
    with make_client(fake, max_retries=0) as client:
        session = client.session(system="be brief")
        with pytest.raises(InternalServerError):
            session.run("go")
        assert [m["role"] for m in session.messages] == ["system"]
        assert session.run("go").content == "hi"
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]


def test_one_step_run_is_sent_with_tool_choice_none(fake):
    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return "v"

    fake.reply("an answer")
    with make_client(fake) as client:
        result = client.session().run("go", tools=[lookup], tool_choice="required", max_steps=1)
    assert result.finished and result.content == "an answer"
    assert [r["body"]["tool_choice"] for r in fake.chat_requests()] == ["none"]


def test_a_forced_tool_choice_without_tools_is_refused(fake):
    with make_client(fake) as client, pytest.raises(ValueError, match="needs tools"):
        client.session().chat("go", tool_choice="required")
    assert fake.chat_requests() == []


@pytest.mark.parametrize("sid", ["team/agent-1", "a?b", "x#y", "50%"])
def test_session_ids_with_url_characters_reach_their_own_session(fake, sid):
    fake.reply("hi")
    fake._session("a")  # "a?b" unescaped would name this one
    with make_client(fake) as client:
        with client.session(id=sid) as session:
            session.chat("hello")
            assert client.get_session(sid).id == sid
        assert sid not in fake.sessions and "a" in fake.sessions


def test_a_plain_function_may_be_the_tool_choice(fake):
    def lookup(key: str) -> str:
        """Look a key up."""
        return "v"

    fake.reply("ok")
    with make_client(fake) as client:
        client.chat([{"role": "user", "content": "go"}], tools=[lookup], tool_choice=lookup)
    assert fake.chat_requests()[0]["body"]["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}


def test_openai_request_options_keep_their_meaning(fake):
    fake.reply("ok")
    with make_client(fake) as client:
        client.chat([{"role": "user", "content": "go"}], extra_headers={"X-Trace": "t1"}, extra_body={"top_k": 5},
                    extra_query={"q": "1"}, timeout=30, session_id="s1", temperature=0.5)  # fmt: skip
    [request] = fake.chat_requests()
    assert request["headers"]["x-trace"] == "t1" and request["headers"]["x-session-id"] == "s1"
    assert request["body"]["top_k"] == 5 and request["body"]["temperature"] == 0.5
    assert not {"extra_headers", "extra_body", "extra_query", "timeout"} & set(request["body"])


def test_a_stream_or_reply_without_choices_is_a_readable_error():
    def serve(body: bytes, content_type: str):
        return httpx.MockTransport(lambda r: httpx.Response(200, headers={"content-type": content_type}, content=body))

    usage_only = b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":[],' \
                 b'"usage":{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}}\n\ndata: [DONE]\n\n'  # fmt: skip
    for body in (b"data: [DONE]\n\n", b"", usage_only):
        with Client("http://gw.test", model="m", max_retries=0, http_client=httpx.Client(transport=serve(body, "text/event-stream"))) as c:
            with pytest.raises(openai.OpenAIError, match="no completion to read"):
                list(c.chat_stream([{"role": "user", "content": "hi"}]))
    empty = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}).encode()
    with Client("http://gw.test", model="m", max_retries=0, http_client=httpx.Client(transport=serve(empty, "application/json"))) as c:
        with pytest.raises(openai.OpenAIError, match="no choices"):
            c.chat([{"role": "user", "content": "hi"}])


def test_a_base_url_without_a_scheme_is_refused_at_once():
    with pytest.raises(ValueError, match="needs a scheme"):
        Client("localhost:8000")


def test_info_of_a_session_not_yet_named_is_a_readable_error(fake):
    with make_client(fake) as client, pytest.raises(ValueError, match="no id yet"):
        client.session(create=False).info()


def test_ctrl_c_during_a_slow_tool_reaches_the_caller_at_once():
    @tool
    def slow() -> str:
        """Takes a while."""
        time.sleep(3)
        return "done"

    import os
    import signal

    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # a real Ctrl-C: it interrupts waits
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ToolRegistry([slow]).run([ToolCall("1", "slow", "{}")])
    assert time.perf_counter() - start < 2.0


def test_tool_on_a_method_binds_to_its_instance():
    class Weather:
        def __init__(self, unit: str) -> None:
            self.unit = unit

        @tool
        def temperature(self, city: str) -> str:
            """A city's temperature."""
            return f"{city}: 20 {self.unit}"

    station = Weather("C")
    assert "self" not in station.temperature.parameters["properties"]
    assert station.temperature("Paris") == "Paris: 20 C"
    registry = ToolRegistry([station.temperature, station.temperature])  # bound twice: one tool
    [result] = registry.run([ToolCall("1", "temperature", '{"city": "Oslo"}')])
    assert result.content == "Oslo: 20 C"


def test_a_none_default_lets_the_model_send_null():
    @tool
    def page(limit: int = None) -> str:  # noqa: RUF013 - the implicit Optional this test is about
        """A page of results."""
        return f"limit={limit}"

    assert {"type": "null"} in page.parameters["properties"]["limit"]["anyOf"]
    [result] = ToolRegistry([page]).run([ToolCall("1", "page", '{"limit": null}')])
    assert result.content == "limit=None" and not result.is_error


def test_decoration_errors_name_the_tool_and_the_parameter():
    def read(path: PurePath) -> str:
        """Read a file."""
        return ""

    with pytest.raises(TypeError, match=r"tool 'read': parameter 'path' \(PurePath\) has no JSON schema"):
        tool(read)

    def sentinel(flag: int = object()) -> str:  # noqa: B008
        """A default JSON cannot hold."""
        return ""

    with pytest.raises(TypeError, match=r"parameter 'flag'"):
        tool(sentinel)

    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    plus_one = tool(functools.partial(add, b=1), name="plus_one")
    assert ToolRegistry([plus_one]).run([ToolCall("1", "plus_one", '{"a": 2}')])[0].content == "3"
    renamed = tool(tool(add), name="sum2")
    assert renamed.name == "sum2" and renamed(1, 2) == 3
    with pytest.raises(TypeError, match="JSON spec"):
        ToolRegistry([renamed.spec])


def test_return_values_reach_the_model_as_json_or_their_repr():
    import pydantic

    class Out(pydantic.BaseModel):
        a: int

    @tool
    def model_out() -> Out:
        """A pydantic model."""
        return Out(a=1)

    @tool
    def tuple_keys() -> dict:
        """Keys JSON cannot hold."""
        return {(1, 2): 3}

    @tool
    def cycle() -> list:
        """A value JSON cannot hold."""
        loop: list = []
        loop.append(loop)
        return loop

    registry = ToolRegistry([model_out, tuple_keys, cycle])
    results = registry.run([ToolCall(str(n), t, "{}") for n, t in enumerate(("model_out", "tuple_keys", "cycle"))])
    assert [r.content for r in results] == ['{"a":1}', '{"(1, 2)":3}', "[[...]]"]
    assert not any(r.is_error for r in results)


def test_stream_events_and_tool_errors_are_exported_at_the_top():
    import agentkv

    for name in ("TextDelta", "ToolCallEvent", "Done", "ToolRegistry", "ToolArgumentsError"):
        assert getattr(agentkv, name).__name__ == name


def test_a_tool_kept_as_a_class_attribute_is_not_bound():
    class Agent:
        lookup = forecast  # defined elsewhere: read through an instance, it stays that tool

    assert Agent().lookup is forecast and "city" in Agent().lookup.parameters["properties"]


def test_hints_resolve_through_functools_wraps_and_nested_forward_references():
    namespace: dict = {}
    exec("import functools\ndef logged(f):\n    @functools.wraps(f)\n    def wrapper(*a, **k):\n        return f(*a, **k)\n"
         "    return wrapper", namespace)  # a decorator from another module  # fmt: skip

    @namespace["logged"]
    def move(p: Point, path: list["Point"]) -> str:  # noqa: UP037 - the nested forward reference under test
        """Move along a path."""
        return f"{p.x},{len(path)}"

    t = tool(move)
    assert t.parameters["properties"]["path"]["items"] == {"$ref": "#/$defs/Point"}
    [result] = ToolRegistry([t]).run([ToolCall("1", "move", '{"p": {"x": 1, "y": 2}, "path": [{"x": 0, "y": 0}]}')])
    assert result.content == "1.0,1"


def test_a_class_is_a_tool_of_its_constructor():
    @dataclass
    class Move:
        """Move a point."""

        p: Point
        steps: int = 1

    t = tool(Move)
    assert set(t.parameters["properties"]) == {"p", "steps"} and t.parameters["required"] == ["p"]
    [result] = ToolRegistry([t]).run([ToolCall("1", "Move", '{"p": {"x": 1, "y": 2}}')])
    assert json.loads(result.content) == {"p": {"x": 1.0, "y": 2.0}, "steps": 1}
