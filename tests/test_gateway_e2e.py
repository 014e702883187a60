"""The real thing: `agentkv up` (Valkey, a prefill worker, a decode worker, the gateway: separate
processes, real model) driven by the real `openai` client. The stack starts once for the module."""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

pytestmark = pytest.mark.heavy

KEY_A, KEY_B = "key-a", "key-b"
BS = 16
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}  # fmt: skip
SYSTEM = "You are a helpful agent that uses tools. " + " ".join(
    f"Rule {i}: read each tool result carefully and answer in one short sentence." for i in range(15)
)


@dataclass
class RunningStack:
    process: subprocess.Popen
    url: str
    prefill: str
    decode: str
    pids: dict[str, int]
    output: list[str]

    def client(self, key: str = KEY_A, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def free_blocks(self) -> dict[str, int]:
        return {name: httpx.get(f"{addr}/internal/health", timeout=5).json()["load"]["free_blocks"]
                for name, addr in (("prefill", self.prefill), ("decode", self.decode))}  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    port = _free_port()
    logs = tmp_path_factory.mktemp("up-logs")
    process = subprocess.Popen(
        [sys.executable, "-m", "agentkv.cli", "up", "--port", str(port), "--api-keys", f"{KEY_A}:alice,{KEY_B}:bob",
         "--log-dir", str(logs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + 300
    while not any("pids" in line for line in output):
        try:
            output.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            process.kill()
            pytest.fail(f"agentkv up did not become ready: {''.join(output)}")
        if process.poll() is not None and lines.empty():
            pytest.fail(f"agentkv up exited: {''.join(output)}")
    ready = next(line for line in output if "ready at" in line)
    pids = dict(pair.split("=") for pair in output[-1].split("pids", 1)[1].split())
    running = RunningStack(
        process=process,
        url=re.search(r"ready at (\S+)/v1", ready).group(1),
        prefill=re.search(r"prefill (http://\S+);", ready).group(1),
        decode=re.search(r"decode (http://\S+);", ready).group(1),
        pids={name: int(pid) for name, pid in pids.items()},
        output=output,
    )
    threading.Thread(target=lambda: [output.append(lines.get()) for _ in iter(int, 1)], daemon=True).start()
    yield running
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def usage_of(completion) -> tuple[int, int, int, dict]:
    u = completion.usage
    return u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens, u.model_extra["agentkv"]


def test_chat_non_stream_and_stream(stack):
    client = stack.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    done = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    assert done.choices[0].message.content and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content  # greedy: the same answer either way
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again


def test_stream_helper_and_a_streamed_tool_call(stack):
    client = stack.client()
    # The helper refuses a reply cut by max_tokens, so let a stop string end it.
    with client.chat.completions.stream(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=40, stop=[".", "!", "\n"], temperature=0) as stream:  # fmt: skip
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert deltas and "".join(deltas) == final.choices[0].message.content

    with client.chat.completions.stream(model="smollm2", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        max_tokens=24, temperature=0) as stream:  # fmt: skip
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    assert final.choices[0].finish_reason == "tool_calls" and "tool_calls.function.arguments.done" in events


def test_tool_call_round_trip(stack):
    client = stack.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What's the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice=named,
                                           max_tokens=24, temperature=0, extra_headers={"x-session-id": "tools-1"})  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args.get("city", "").lower().startswith("paris")

    messages += [message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Paris", "sky": "sunny", "temp_c": 21})}]  # fmt: skip
    final = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=24, temperature=0, extra_headers={"x-session-id": "tools-1"})  # fmt: skip
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    prompt, _, cached, stats = usage_of(final)
    assert stats["ledger"] == "extended"  # the tool-call turn continued token-exactly
    assert cached >= usage_of(first)[0] - BS


def test_errors(stack):
    url = f"{stack.url}/v1"
    bad_json = httpx.post(f"{url}/chat/completions", content=b'{"model": "m", "messages": [', timeout=30,
                          headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/json"})  # fmt: skip
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"

    client = stack.client()
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hello " * 9000}], max_tokens=4)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.status_code == 400

    unknown = httpx.get(f"{url}/sessions/no-such-session", headers={"authorization": f"Bearer {KEY_A}"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "session_not_found"

    with pytest.raises(openai.AuthenticationError) as bad_key:
        stack.client("wrong-key").chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    assert bad_key.value.status_code == 401

    with pytest.raises(openai.BadRequestError, match=r"<= 1 \(at n\)") as two_choices:  # the schema's limit (openai_schema.OneChoice)
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], n=2)
    assert two_choices.value.param == "n"


def test_four_turn_agent_session_reuses_the_cache(stack):
    client = stack.client()
    headers = {"x-session-id": "agent-session-4"}
    system = "You run builds. " + SYSTEM  # a prompt no other test sent: the session starts cold
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Check the build status."}]
    turns = []
    for n in range(4):
        raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=messages, max_tokens=16,
                                                               temperature=0, extra_headers=headers)  # fmt: skip
        done = raw.parse()
        turns.append((usage_of(done), raw.headers["x-agentkv-route"]))
        messages += [{"role": "assistant", "content": done.choices[0].message.content},
                     {"role": "user", "content": f"Tool output {n}: " + " ".join(f"step {i} passed." for i in range(25))}]  # fmt: skip
    for n, ((prompt, completion, cached, stats), route) in enumerate(turns):
        # Each turn's new text (~150 tokens) is more than D may prefill itself, so P computes it and
        # exactly the blocks D lacks move: all of them on turn 1, only the new ones afterwards.
        lacked_blocks = math.ceil(prompt / BS) - cached // BS
        assert stats["prefill_node"] == "prefill-0", (n, route)
        assert stats["transferred_blocks"] == lacked_blocks, (n, stats, route)
        assert stats["transferred_tokens"] <= prompt - cached, (n, stats)
        if n == 0:
            assert cached == 0 and lacked_blocks == math.ceil(prompt / BS)
            continue
        (prev_prompt, prev_completion, _, _), _ = turns[n - 1]
        assert stats["ledger"] == "extended", (n, stats)
        assert cached >= 0.9 * (prev_prompt + prev_completion), (n, cached, prev_prompt, prev_completion, route)
        assert stats["decode_node"] == turns[0][0][3]["decode_node"]
    session = httpx.get(f"{stack.url}/v1/sessions/agent-session-4", headers={"authorization": f"Bearer {KEY_A}"}).json()
    assert session["turns"] == 4 and session["cached_tokens"] == sum(t[0][2] for t in turns)
    deleted = httpx.delete(f"{stack.url}/v1/sessions/agent-session-4", headers={"authorization": f"Bearer {KEY_A}"}).json()
    assert deleted["unpinned_nodes"] == [turns[0][0][3]["decode_node"]]


def test_tenant_isolation(stack):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Summarise the rules."}]
    a = [stack.client(KEY_A).chat.completions.create(model="smollm2", messages=messages, max_tokens=4, temperature=0) for _ in range(2)]
    b = stack.client(KEY_B).chat.completions.create(model="smollm2", messages=messages, max_tokens=4, temperature=0)
    assert usage_of(a[1])[2] >= usage_of(a[1])[0] - BS  # alice hits her own prefix
    assert usage_of(b)[2] == 0  # bob gets nothing from alice's


def test_disconnect_mid_stream_frees_every_pool(stack):
    before = stack.free_blocks()
    body = {"model": "smollm2", "max_tokens": 400, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell a very long story about a lighthouse keeper. " * 12}]}  # fmt: skip
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY_A}"}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 4:
                    during = stack.free_blocks()
                    break
    assert during["decode"] < before["decode"]  # the request held blocks while streaming
    deadline = time.monotonic() + 15
    while (now := stack.free_blocks()) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now == before


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_each_worker_is_pinned_to_a_core_of_its_own(stack):
    prefill, decode = (os.sched_getaffinity(stack.pids[role]) for role in ("prefill", "decode"))
    assert len(prefill) == len(decode) == 1 and prefill != decode


def test_a_reply_whose_decode_worker_is_killed_mid_stream_finishes_on_the_other_worker(stack):
    """kill -9 of the decode worker after three chunks: the prefill worker (the only live one until
    `up` restarts the decode worker) continues from the tokens already sent, and the client gets the
    reply an uninterrupted run gave. The request offers a tool, as agents' do, so the reply is bound to
    a grammar that the prefill worker resumes mid-reply (`grammar_resume`)."""
    client = stack.client()
    ask = dict(model="smollm2", max_tokens=48, temperature=0, tools=[WEATHER],
               messages=[{"role": "user", "content": "Count from 1 to 100."}])  # fmt: skip
    whole = client.chat.completions.create(**ask).choices[0].message.content
    texts, arrivals, killed_at = [], [], None
    for n, chunk in enumerate(client.chat.completions.create(**ask, stream=True)):
        texts += [c.delta.content or "" for c in chunk.choices]
        arrivals.append(time.monotonic())
        if n == 3:
            os.kill(stack.pids["decode"], signal.SIGKILL)
            killed_at = time.monotonic()
    assert killed_at is not None and "".join(texts) == whole
    resumed_at = next(t for t in arrivals if t > killed_at)
    print(f"\nmoved to the prefill worker: next chunk {resumed_at - killed_at:.2f} s after the kill, last "
          f"{arrivals[-1] - killed_at:.2f} s after it")
    metrics = httpx.get(f"{stack.url}/metrics", timeout=5).text
    assert "agentkv_gateway_migrations_total 1.0" in metrics
    deadline = time.monotonic() + 120  # `up` restarts the decode worker: wait for it, for the tests after
    while not any("agentkv up: decode is back" in line for line in stack.output) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any("agentkv up: decode exited (killed by SIGKILL); restarting" in line for line in stack.output)
    assert any("agentkv up: decode is back" in line for line in stack.output)


def test_ctrl_c_stops_every_process(stack):
    """Last on purpose: `agentkv up` leaves nothing behind, and a stream still running when Ctrl-C comes
    ends with a clean, coded error (issue 13 #6: it was a code-null "internal gateway error")."""
    body = {"model": "smollm2", "max_tokens": 400, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell a very long story about a lighthouse keeper."}]}  # fmt: skip
    events: list[str] = []
    streaming = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{stack.url}/v1/chat/completions", json=body,
                                                             headers={"authorization": f"Bearer {KEY_A}"}) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 4:
                        streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60), events
    stack.process.send_signal(signal.SIGINT)
    reader.join(timeout=60)
    error = json.loads(events[-1])["error"]
    print(f"\nCtrl-C mid-stream: the stream's last event after {len(events)}: {error}")
    assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable_error", events[-3:]
    assert stack.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    alive = dict(stack.pids)
    while alive and time.monotonic() < deadline:
        alive = {name: pid for name, pid in alive.items() if _alive(pid)}
        time.sleep(0.1)
    assert not alive, alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
