"""The SDK against the real stack (`agentkv.stack.Stack`: Valkey, prefill and decode workers and the
gateway as separate processes, on SmolLM2-135M).

The stack is started once and shared with tests/test_examples.py (which imports `stack_url` from
here); it stops after this module, or when pytest exits. The 135M model gets the help any small model
gets: worked examples of the call format in the history, and a forced first step (`tool_choice`
naming the tool, or "required" where the model must choose how many calls to make); greedy
decoding keeps its choices stable from run to run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentkv import BadRequestError, NotFoundError
from agentkv.client import AsyncClient, Client, Done, TextDelta
from agentkv.tools import tool

pytestmark = pytest.mark.heavy

_STACK = None


def shared_stack(config: pytest.Config):
    """One real stack for every module that needs it (started on first use; stopped by
    `release_stack()` or, at the latest, when pytest exits)."""
    global _STACK
    if _STACK is None:
        from agentkv.stack import Stack

        _STACK = Stack(port=0).start(timeout_s=400)
        config.add_cleanup(_STACK.stop)  # idempotent
    return _STACK


def release_stack() -> None:
    global _STACK
    if _STACK is not None:
        _STACK.stop()
        _STACK = None


@pytest.fixture(scope="module")
def stack_url(request: pytest.FixtureRequest):
    yield shared_stack(request.config).url
    if request.module.__name__ == __name__:  # the last module to use it (alphabetically): free the cores now
        release_stack()


SYSTEM = "You are a helpful assistant with tools. Call a tool when it helps, then answer in one short sentence using its result."


def _call(n: int, city: str) -> dict:
    return {"id": f"call_example_{n}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


# Worked examples: one call, then two calls in one turn, twice (the model learns the parallel form from them).
EXAMPLES = [
    {"role": "user", "content": "Use get_weather: what is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [_call(1, "Rome")]},
    {"role": "tool", "tool_call_id": "call_example_1", "content": "The weather in Rome is 18 degrees and cloudy."},
    {"role": "assistant", "content": "It is 18 degrees and cloudy in Rome."},
    {"role": "user", "content": "Use get_weather: what is the weather in Madrid and in Berlin?"},
    {"role": "assistant", "content": None, "tool_calls": [_call(2, "Madrid"), _call(3, "Berlin")]},
    {"role": "tool", "tool_call_id": "call_example_2", "content": "The weather in Madrid is 30 degrees and sunny."},
    {"role": "tool", "tool_call_id": "call_example_3", "content": "The weather in Berlin is 12 degrees and rainy."},
    {"role": "assistant", "content": "Madrid: 30 degrees and sunny. Berlin: 12 degrees and rainy."},
    {"role": "user", "content": "Use get_weather: what is the weather in Lisbon and in Vienna?"},
    {"role": "assistant", "content": None, "tool_calls": [_call(4, "Lisbon"), _call(5, "Vienna")]},
    {"role": "tool", "tool_call_id": "call_example_4", "content": "The weather in Lisbon is 25 degrees and windy."},
    {"role": "tool", "tool_call_id": "call_example_5", "content": "The weather in Vienna is 9 degrees and foggy."},
    {"role": "assistant", "content": "Lisbon: 25 degrees and windy. Vienna: 9 degrees and foggy."},
]


class WeatherService:
    """A real Python tool that records when each call ran (to measure concurrency)."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.calls: list[tuple[str, float, float]] = []  # (city, start, end)
        self._lock = threading.Lock()

        @tool
        def get_weather(city: str) -> str:
            """Get the current weather in a city.

            Args:
                city: The city name, e.g. Paris.
            """
            start = time.perf_counter()
            time.sleep(self.delay_s)
            with self._lock:
                self.calls.append((city, start, time.perf_counter()))
            if self.fail:
                raise ConnectionError("the weather service is down")
            return f"The weather in {city} is 23 degrees and sunny."

        @tool
        def get_local_time(city: str) -> str:
            """Get the local time in a city.

            Args:
                city: The city name, e.g. Paris.
            """
            return f"It is 10:30 in {city}."

        # Two tools, not one: the gateway reads tool_choice="required" with a single tool as that
        # tool named, which allows one call only; the parallel test needs the model free to make two.
        self.tools = [get_weather, get_local_time]


def weather_session(client: Client, service: WeatherService):
    session = client.session(system=SYSTEM, tools=service.tools, temperature=0, max_tokens=96)
    session.messages += EXAMPLES
    return session


def test_run_executes_the_tool_the_model_asked_for_and_answers_with_its_result(stack_url):
    service = WeatherService()
    with Client(stack_url) as client, weather_session(client, service) as session:
        result = session.run("Use get_weather: what is the weather in Paris?", tool_choice="get_weather", max_steps=2)
        info = session.info()
    assert [city for city, *_ in service.calls] == ["Paris"]
    assert [r.is_error for r in result.tool_results] == [False]
    assert result.finished and "23" in (result.content or ""), result.content
    assert info.turns == 2 and info.id == session.id
    first, second = result.turns
    assert second.cached_tokens >= 0.9 * (first.prompt_tokens + first.completion_tokens)
    assert second.ttft_s is not None and second.decode_node


def test_parallel_tool_calls_run_concurrently(stack_url):
    service = WeatherService(delay_s=0.5)
    with Client(stack_url) as client, weather_session(client, service) as session:
        result = session.run("Use get_weather: what is the weather in Paris and in London?", tool_choice="required", max_steps=2)
    assert sorted(city for city, *_ in service.calls) == ["London", "Paris"], result.tool_results
    starts, ends = [s for _, s, _ in service.calls], [e for *_, e in service.calls]
    span = max(ends) - min(starts)
    assert max(starts) < min(ends), "the two calls did not overlap"
    assert span < 0.9, f"two 0.5 s tools took {span:.2f} s: they ran one after the other"
    assert result.finished and "23" in (result.content or "")


def test_raising_tool_becomes_a_tool_error_message(stack_url):
    service = WeatherService(fail=True)
    with Client(stack_url) as client, weather_session(client, service) as session:
        result = session.run("Use get_weather: what is the weather in Oslo?", tool_choice="get_weather", max_steps=2)
        tool_messages = [m for m in session.messages[len(EXAMPLES) + 1 :] if m["role"] == "tool"]
    assert service.calls and result.tool_results[0].is_error
    assert tool_messages == [{"role": "tool", "tool_call_id": result.tool_results[0].call.id,
                              "content": "Error: ConnectionError: the weather service is down"}]  # fmt: skip
    assert result.finished and result.steps == 2 and result.content  # the model got the error and answered


def test_session_streams_text_and_reports_the_cache(stack_url):
    with Client(stack_url) as client, client.session(temperature=0, max_tokens=12) as session:
        events = list(session.stream("Say hello to Ada."))
        second = session.chat("Now say goodbye.")
        info = session.info()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text and isinstance(events[-1], Done) and events[-1].result.content == text
    first = session.turns[0]
    assert first.ttft_s is not None and 0 < first.ttft_s <= first.latency_s
    assert second.stats.cached_tokens >= 0.9 * (first.prompt_tokens + first.completion_tokens) - 16  # block granularity
    assert info.turns == 2 and info.prompt_tokens == first.prompt_tokens + second.stats.prompt_tokens


def test_gateway_errors_arrive_as_typed_errors(stack_url):
    with Client(stack_url, max_retries=0) as client:
        with pytest.raises(NotFoundError) as missing:
            client.get_session("no-such-session")
        with pytest.raises(BadRequestError) as info:
            client.chat([{"role": "user", "content": "hello " * 12000}], max_tokens=4)
    assert missing.value.code == "session_not_found"
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"


def test_a_slash_id_and_a_refused_call_on_the_real_stack(stack_url):
    """An id with "/" reaches its own session through the real gateway; a refused call (too long) leaves
    the history as it was, so the next call is the session's first turn."""
    with Client(stack_url, max_retries=0) as client:
        with client.session(id="team/agent-1", temperature=0, max_tokens=6) as session:
            with pytest.raises(BadRequestError):
                session.chat("hello " * 12000)
            assert session.messages == []
            session.chat("Say one word.")
            info = client.get_session("team/agent-1")
            assert info.id == "team/agent-1" and info.turns == 1
            assert [m["role"] for m in session.messages] == ["user", "assistant"]
        with pytest.raises(NotFoundError):  # deleted on exit, by its escaped path
            client.get_session("team/agent-1")


def test_async_client_session_on_the_real_stack(stack_url):
    async def go():
        async with AsyncClient(stack_url) as client:
            async with client.session(temperature=0, max_tokens=8) as session:
                reply = await session.chat("Say one word.")
                return reply, await session.info()

    reply, info = asyncio.run(go())
    assert reply.content and info.turns == 1 and reply.stats.prompt_tokens > 0


BASE_INSTALL_SESSION = """
import json, sys
import agentkv
with agentkv.Client(sys.argv[1]) as client, client.session(temperature=0, max_tokens=8) as session:
    reply = session.chat("Say one word.")
    info = session.info()
heavy = sorted(m for m in ("torch", "transformers", "litestar", "redis", "numpy", "nixl") if m in sys.modules)
print(json.dumps({"content": reply.content, "prompt_tokens": reply.stats.prompt_tokens,
                  "decode_node": reply.stats.decode_node, "turns": info.turns, "heavy": heavy}))
"""


def test_the_base_install_runs_a_session_without_torch(stack_url, tmp_path):
    """`pip install agentkv` (no extras) into a fresh venv: no torch, and the SDK talks to the gateway."""
    root = Path(__file__).resolve().parents[1]
    source, venv = tmp_path / "src", tmp_path / "venv"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    run = subprocess.run([python, "-c", BASE_INSTALL_SESSION, stack_url], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["content"] and result["prompt_tokens"] > 0 and result["decode_node"] and result["turns"] == 1, result
    assert result["heavy"] == [], result
