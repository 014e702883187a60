"""The examples/ scripts and `agentkv demo`: on the scripted fake (fast: wiring and parsing) and on
the real stack (heavy: the real model, the real frameworks, the real cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from test_sdk_fakes import FakeGateway, fake, fake_url  # noqa: F401 (fixtures)
from test_sdk_stack import stack_url  # noqa: F401 (the shared real stack)

from agentkv.client import Client
from agentkv.stack import free_port

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_cache_reused(turns: list[dict]) -> None:
    """The acceptance rule: every turn >= 2 finds >= 90% of the previous prompt + completion cached."""
    assert len(turns) >= 3, turns
    for n, (prev, cur) in enumerate(zip(turns, turns[1:], strict=False), start=2):
        floor = 0.9 * (prev["prompt_tokens"] + prev["completion_tokens"])
        assert cur["cached_tokens"] >= floor, f"turn {n}: {cur['cached_tokens']} cached < {floor:.0f}: {turns}"


# ------------------------------------------------------------------------------------- on the fake


def test_agent_loop_runs_one_tool_per_question_in_one_session(fake_url, fake):
    agent_loop = load("agent_loop")
    with Client(fake_url) as client:
        session = agent_loop.run_session(client)
    choices = [r["body"]["tool_choice"] for r in fake.chat_requests()]
    named = [c["function"]["name"] for c in choices if isinstance(c, dict)]
    assert named == [name for _, name in agent_loop.QUESTIONS] and choices.count("none") == 3
    assert len({r["headers"]["x-session-id"] for r in fake.chat_requests()}) == 1
    assert_cache_reused([t.as_dict() for t in session.turns])
    assert session.id not in fake.sessions or fake.sessions[session.id]["turns"] == 6


def test_agent_loop_tools_are_real():
    agent_loop = load("agent_loop")
    readme_lines = len((ROOT / "README.md").read_text(encoding="utf-8", errors="replace").splitlines())
    assert agent_loop.count_lines("README.md") == readme_lines
    assert agent_loop.multiply(37, 91) == 3367 and agent_loop.multiply(0.5, 3) == 1.5
    assert agent_loop.current_time("UTC").endswith("UTC")
    with pytest.raises(ValueError, match="outside the project"):
        agent_loop.count_lines("../../etc/passwd")


def test_openai_client_example_on_the_fake(fake_url):
    usages = load("openai_client").main(["--base-url", fake_url])
    assert len(usages) == 3 and all(u["cached_tokens"] > 0 for u in usages[1:])


def test_agents_sdk_example_on_the_fake(fake_url, fake):
    answer = load("agents_sdk").main(["--base-url", fake_url])
    assert "23 degrees Celsius in Paris" in answer
    assert fake.chat_requests()[0]["body"]["tool_choice"] == "required"


def test_langchain_example_on_the_fake(fake_url, fake):
    answer, messages = load("langchain_tools").run(fake_url)
    assert answer == "Result: Paris is not sold here"  # the fake calls check_stock(item="Paris")
    assert [type(m).__name__ for m in messages[-3:]] == ["AIMessage", "ToolMessage", "AIMessage"]


# -------------------------------------------------------------------------------- on the real stack


@pytest.mark.heavy
def test_agent_loop_answers_from_its_tools_on_the_real_model(stack_url):
    agent_loop = load("agent_loop")
    answers = []
    with Client(stack_url) as client:
        session = agent_loop.run_session(client, on_answer=lambda q, r: answers.append(r))
    results = [r.tool_results for r in answers]
    assert [[t.call.name for t in rs] for rs in results] == [["count_lines"], ["multiply"], ["current_time"]]
    assert all(not t.is_error for rs in results for t in rs), results
    assert results[1][0].value == 3367 and "3367" in (answers[1].content or ""), answers[1].content
    assert_cache_reused([t.as_dict() for t in session.turns])


@pytest.mark.heavy
def test_openai_client_example_on_the_real_stack(stack_url):
    usages = load("openai_client").main(["--base-url", stack_url])
    assert len(usages) == 3
    for prev, cur in zip(usages, usages[1:], strict=False):
        assert cur["cached_tokens"] >= prev["prompt_tokens"] - 16  # at least the previous prompt's full blocks


@pytest.mark.heavy
def test_agents_sdk_example_on_the_real_stack(stack_url):
    answer = load("agents_sdk").main(["--base-url", stack_url])
    assert "23" in answer  # get_temperature("Paris") said 23 degrees


@pytest.mark.heavy
def test_langchain_example_on_the_real_stack(stack_url):
    answer, messages = load("langchain_tools").run(stack_url)
    tool_outputs = [m.content for m in messages if type(m).__name__ == "ToolMessage"][1:]  # after the worked example
    assert tool_outputs == ["7 pears in stock"] and "7" in answer, (tool_outputs, answer)


@pytest.mark.heavy
def test_demo_json_shows_the_cache_at_work_on_every_turn(tmp_path):
    """`agentkv demo --json` end to end: its own stack, the agent session, one JSON object, clean exit."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "agentkv.cli", "demo", "--json", "--port", str(free_port())],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    turns = result["turns"]
    assert all(set(t) == {"prompt_tokens", "cached_tokens", "transferred_tokens", "completion_tokens", "ttft_s"} for t in turns)
    assert_cache_reused(turns)
    assert all(t["ttft_s"] is not None and t["ttft_s"] > 0 for t in turns)
    assert elapsed < 300, f"the demo took {elapsed:.0f} s"
