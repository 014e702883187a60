"""Every bad input of issue 13 (and the ones found since) against the real stack, as one table: each
gets its documented status and error code in OpenAI's envelope, never a 5xx, a traceback or a hang.
The inputs that used to break something carry the issue's item number.

The stack is the shared one (tests/test_sdk_stack.py): open access, so nothing here needs a key.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from test_sdk_stack import stack_url  # noqa: F401 (the shared real stack)

pytestmark = pytest.mark.heavy

USER = [{"role": "user", "content": "Say hi."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def chat(**extra: Any) -> dict:
    return {"model": "smollm2", "messages": USER, "max_tokens": 4, "temperature": 0, **extra}


@dataclass
class Case:
    name: str
    status: int
    code: str | None  # the envelope's code (None: a 2xx)
    json: Any = None
    raw: bytes | None = None  # sent as is, as application/json
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # the envelope's param, where one is expected


CASES = [
    # -- 1-5: server errors and stalls
    Case("#1 model text with U+2028/U+2029/U+0085", 200, None, path="/v1/completions",
         json={"model": "m", "prompt": "a\u2028b\u2028c\u2028d\u2028e\u2028f\u2028g\u2028", "max_tokens": 8, "temperature": 0}),
    Case("#2 a session id that is not latin-1", 200, None, json=chat(user="渡辺")),
    Case("#2 a non-latin-1 session id, streamed", 200, None, json=chat(user="渡辺-stream", stream=True)),
    Case("#3 token ids below the vocabulary", 400, "invalid_request", path="/v1/completions", json={"model": "m", "prompt": [-5] * 20}, param="prompt"),
    Case("#3 a token id above the vocabulary", 400, "invalid_request", path="/v1/completions", json={"model": "m", "prompt": [99999999]}, param="prompt"),
    Case("#4 JSON nested 1,500 levels", 400, "invalid_request", path="/v1/completions",
         raw=b'{"model": "m", "prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"),
    Case("#5 a 2 MB message", 400, "context_length_exceeded", json=chat(messages=[{"role": "user", "content": "word " * 400_000}]), param="messages"),
    Case("#5 a body over the 8 MiB limit", 413, "request_too_large", raw=b" " * (9 * 1024 * 1024)),
    # -- 13: the limits the schema declares
    Case("#13 no messages", 400, "invalid_request", json=chat(messages=[]), param="messages"),
    Case("#13 temperature above 2", 400, "invalid_request", json=chat(temperature=2.5), param="temperature"),
    Case("#13 temperature below 0", 400, "invalid_request", json=chat(temperature=-1), param="temperature"),
    Case("#13 top_p 0", 400, "invalid_request", json=chat(top_p=0), param="top_p"),
    Case("#13 max_tokens 0", 400, "invalid_request", json=chat(max_tokens=0), param="max_tokens"),
    Case("#13 max_completion_tokens -1", 400, "invalid_request", json=chat(max_completion_tokens=-1), param="max_completion_tokens"),
    Case("#13 n 2", 400, "invalid_request", json=chat(n=2), param="n"),
    Case("#13 a seed beyond 64 bits", 400, "invalid_request", json=chat(seed=2**64), param="seed"),
    Case("#13 an empty session id", 400, "invalid_request", json=chat(session_id=""), param="session_id"),
    Case("#13 a 300-character session id", 400, "invalid_request", json=chat(session_id="s" * 300), param="session_id"),
    # -- 14: protocol errors
    Case("#14 malformed JSON", 400, "invalid_request", raw=b'{"model": "m", "messages": ['),
    Case("#14 a session TTL under 1 ms", 400, "invalid_request", path="/v1/sessions", json={"id": "short", "ttl_s": 0.0001}, param="ttl_s"),
    Case("#14 a session TTL under 1 ms on a turn", 400, "invalid_request", json=chat(session_id="short-turn", session_ttl_s=0.0001)),
    # -- 15: what OpenAI refuses
    Case("#15 tool parameters that are not a JSON Schema", 400, "invalid_request",
         json=chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]), param="tools[0].function.parameters"),
    Case("#15 a tool type other than function", 400, "invalid_request", json=chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), param="tools"),
    Case("#15 a tool result that answers no call", 400, "invalid_request",
         json=chat(tools=[WEATHER], messages=[*USER, {"role": "tool", "tool_call_id": "call_nowhere", "content": "18 C"}])),
    Case("#15 five stop strings", 400, "invalid_request", json=chat(stop=["a", "b", "c", "d", "e"]), param="stop"),
    Case("#15 an unknown response_format", 400, None, json=chat(response_format={"type": "xml"}), param="response_format"),
    # -- found since: by the fuzzer
    Case("a top_p below float32's range (the sampler dropped every token: 502)", 200, None, path="/v1/completions",
         json={"model": "m", "prompt": "hi", "max_tokens": 4, "top_p": 1.2555839591686888e-226}),
    Case("a session created with a 1 ms TTL (was read back after it expired: 404)", 201, None, path="/v1/sessions",
         json={"ttl_s": 0.001}),
    # -- found since: the shape of the request
    Case("messages is a string", 400, "invalid_request", json={"model": "m", "messages": "hi"}),
    Case("no model", 400, "invalid_request", json={"messages": USER}),
    Case("a JSON array as the body", 400, "invalid_request", raw=b"[]"),
    Case("an empty body", 400, "invalid_request", raw=b""),
    Case("a message without a role", 400, "invalid_request", json=chat(messages=[{"content": "hi"}])),
    Case("an empty prompt", 400, "invalid_request", path="/v1/completions", json={"model": "m", "prompt": ""}, param="prompt"),
    Case("batched prompts", 400, "unsupported_parameter", path="/v1/completions", json={"model": "m", "prompt": ["a", "b"]}, param="prompt"),
    Case("logprobs", 400, "unsupported_parameter", json=chat(logprobs=True), param="logprobs"),
    Case("echo", 400, "unsupported_parameter", path="/v1/completions", json={"model": "m", "prompt": "hi", "echo": True}, param="echo"),
    Case("a session id with a space (header)", 400, "invalid_request", json=chat(), headers={"x-session-id": "two words"}, param="session_id"),
    Case("an x-session-ttl that is not a number", 400, "invalid_request", json=chat(), headers={"x-session-ttl": "soon"}, param="x-session-ttl"),
    # -- found since: what agent frameworks send (a review of the request fields, 2026-12-03)
    Case("a user that is no session id (was a 400 about session_id)", 200, None, json=chat(user="Jane Doe")),
    Case("a 300-character prompt_cache_key", 200, None, json=chat(prompt_cache_key="k" * 300)),
    Case("Codex's session_id header", 200, None, json=chat(), headers={"session_id": "codex-1"}),
    Case("a schema of false (was a 500)", 400, "invalid_request",
         json=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": False}}), param="response_format"),
    Case("a non-strict tool with uniqueItems and a password format (were a 400)", 200, None,
         json=chat(max_tokens=24, tool_choice="required", tools=[{"type": "function", "function": {"name": "tag", "parameters": {
             "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                                              "token": {"type": "string", "format": "password"}}}}}])),
    Case("the same tool, strict", 400, "unsupported_parameter",
         json=chat(tools=[{"type": "function", "function": {"name": "tag", "strict": True, "parameters": {
             "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}]),
         param="tools[0].function.parameters"),
    Case("penalties and logit_bias (were ignored)", 200, None, json=chat(presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={"42": -100})),
    Case("presence_penalty above 2", 400, "invalid_request", json=chat(presence_penalty=2.5), param="presence_penalty"),
    Case("a logit_bias key that is no token id", 400, "invalid_request", json=chat(logit_bias={"999999": 5}), param="logit_bias"),
    Case("top_k", 200, None, json=chat(top_k=5, temperature=1.0)),
    Case("top_k below -1", 400, "invalid_request", json=chat(top_k=-2), param="top_k"),
    Case("legacy functions (were ignored)", 400, "unsupported_parameter",
         json=chat(functions=[WEATHER["function"]], function_call="auto"), param="functions"),
    Case("a legacy function_call in the history", 400, "unsupported_parameter",
         json=chat(messages=[*USER, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
                             {"role": "function", "name": "get_weather", "content": "18 C"}]), param="messages[1].function_call"),
    Case("suffix (was ignored)", 400, "unsupported_parameter", path="/v1/completions",
         json={"model": "m", "prompt": "def f(", "suffix": "return x"}, param="suffix"),
    Case("best_of 3", 400, "unsupported_parameter", path="/v1/completions", json={"model": "m", "prompt": "hi", "best_of": 3}, param="best_of"),
    Case("logprobs 0 (was ignored)", 400, "unsupported_parameter", path="/v1/completions",
         json={"model": "m", "prompt": "hi", "logprobs": 0}, param="logprobs"),
    Case("an unknown session", 404, "session_not_found", method="GET", path="/v1/sessions/never-made"),
    Case("deleting an unknown session", 404, "session_not_found", method="DELETE", path="/v1/sessions/never-made"),
    Case("an unknown route", 404, "not_found", method="GET", path="/v1/nothing-here"),
    Case("the wrong method", 405, "method_not_allowed", method="GET"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_documented_answer(stack_url, case: Case):  # noqa: F811
    headers = {"content-type": "application/json", **case.headers} if case.raw is not None else case.headers
    started = time.perf_counter()
    r = httpx.request(case.method, stack_url + case.path, json=case.json, content=case.raw, headers=headers, timeout=60)
    took = time.perf_counter() - started
    assert r.status_code == case.status, (case.name, r.status_code, r.text[:500])
    assert took < 30, f"{case.name}: {took:.1f} s"
    if case.status == 405:
        assert "POST" in r.headers.get("allow", "")
    if case.status < 300:
        if case.json and case.json.get("stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all('"error"' not in e for e in events), events
        return
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["code"] == case.code if case.code else error["code"], error
    if case.param:
        assert error["param"] == case.param, error


def test_a_2mb_message_is_refused_fast_while_health_stays_fast(stack_url):  # noqa: F811
    """#5 on the real gateway: before, the 2 MB message took 10-18 s and a concurrent /health waited 9.7 s."""
    body = json.dumps(chat(messages=[{"role": "user", "content": "word " * 400_000}])).encode()
    result: dict[str, Any] = {}

    def post() -> None:
        t = time.perf_counter()
        r = httpx.post(f"{stack_url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
        result["status"], result["code"], result["took"] = r.status_code, r.json()["error"]["code"], time.perf_counter() - t

    with httpx.Client(timeout=30) as client:
        client.get(f"{stack_url}/health")  # a warm connection
        thread = threading.Thread(target=post)
        thread.start()
        health = []
        while thread.is_alive() or not health:
            t = time.perf_counter()
            assert client.get(f"{stack_url}/health").status_code == 200
            health.append(time.perf_counter() - t)
        thread.join()
    print(f"\n2 MB message: {result['status']} {result['code']} in {result['took'] * 1000:.0f} ms; "
          f"{len(health)} concurrent /health, max {max(health) * 1000:.0f} ms")  # fmt: skip
    assert (result["status"], result["code"]) == (400, "context_length_exceeded")
    assert result["took"] < 5.0 and max(health) < 2.0  # the bug: 10-18 s, /health stalled 9.7 s
