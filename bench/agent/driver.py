"""The client side of the benchmark: the same streaming OpenAI requests to every system.

Each request streams (SSE, `stream_options.include_usage`) so time to first token and the gaps
between tokens are seen as a user sees them. What the server says about the prompt comes from
`usage` (`prompt_tokens_details.cached_tokens`, and agentkv's `usage.agentkv`: a RouteStats with
prefilled and transferred tokens and the nodes) and the `x-agentkv-route` header (a RouteStats as
planned when the stream starts); a server that sends neither (the peer) reports nothing cached.
A failed request is recorded, never raised: a benchmark counts failures instead of stopping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec
from httpx_sse import aconnect_sse

from bench.agent.mooncake import ReplayRequest
from bench.agent.workload import AgentPlan, SessionScript, messages_for
from kvstore.wire import ROUTE_HEADER, RouteStats

SESSION_HEADER = "x-session-id"


class Outcome(msgspec.Struct, kw_only=True):
    """One request as the client saw it (times in seconds; `sent_s` from the run's start)."""

    kind: str  # "turn" (agent session) | "doc" (long document) | "replay" (trace) | "warmup"
    id: str  # session id, or the request's own id
    turn: int = 0  # 1-based turn within its session
    sent_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = msgspec.field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # found in the decode node's own cache
    cache_reported: bool = False  # the server's usage says what it found cached (the peer's does not)
    agentkv: RouteStats | None = None  # usage.agentkv: what the turn computed and moved (agentkv only)
    route: RouteStats | None = None  # the x-agentkv-route header
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens not computed for this request: the decode node's cache, or a prefill
        node's cache whose blocks were then moved."""
        if self.agentkv is None:
            return self.cached_tokens
        return max(0, self.prompt_tokens - self.agentkv.prefilled_tokens)


class DriveResult(msgspec.Struct):
    outcomes: list[Outcome]
    duration_s: float  # first request sent -> last one finished (warm-up excluded)


class Driver:
    """Async client for one server. `model=None` takes the first id of its /v1/models."""

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 600.0) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))  # fmt: skip
        self.model = model

    async def __aenter__(self) -> Driver:
        if self.model is None:
            resp = await self.http.get("/v1/models")
            resp.raise_for_status()
            self.model = resp.json()["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    # -- workloads ------------------------------------------------------------------------
    async def run_agent(self, plan: AgentPlan) -> DriveResult:
        """Warm-up (not timed: it makes the shared prefix hot), then sessions and documents on
        their schedules. Sessions are deleted afterwards so their pinned blocks are released."""
        warm = await self.chat(plan.warmup, 1, kind="warmup", id="warmup")
        t0 = time.perf_counter()
        tasks = [self._session(plan, s, t0) for s in plan.sessions]
        tasks += [self._at(d.at_s, t0, self.chat(d.messages, d.max_tokens, kind="doc", id=d.id, t0=t0)) for d in plan.docs]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        await asyncio.gather(*(self.delete_session(s.id) for s in plan.sessions))
        outcomes = [warm] + [o for r in results for o in (r if isinstance(r, list) else [r])]
        return DriveResult(outcomes, duration)

    async def run_replay(self, requests: list[ReplayRequest]) -> DriveResult:
        """Open loop: every request at its trace time, whatever the server's state."""
        t0 = time.perf_counter()
        tasks = [self._at(r.at_s, t0, self.complete(r.prompt, r.max_tokens, kind="replay", id=r.id, t0=t0)) for r in requests]
        outcomes = list(await asyncio.gather(*tasks))
        return DriveResult(outcomes, time.perf_counter() - t0)

    # -- requests -------------------------------------------------------------------------
    async def chat(self, messages: list[dict], max_tokens: int, *, kind: str, id: str, turn: int = 0,
                   session: str | None = None, t0: float | None = None) -> Outcome:  # fmt: skip
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens}
        headers = {SESSION_HEADER: session} if session else {}
        return await self._stream("/v1/chat/completions", body, headers, Outcome(kind=kind, id=id, turn=turn), t0)

    async def complete(self, prompt: str, max_tokens: int, *, kind: str, id: str, t0: float | None = None) -> Outcome:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens}
        return await self._stream("/v1/completions", body, {}, Outcome(kind=kind, id=id), t0)

    async def delete_session(self, session_id: str) -> None:
        """Best effort: a server without sessions answers 404, which is fine."""
        try:
            await self.http.delete(f"/v1/sessions/{session_id}")
        except httpx.HTTPError:
            pass

    # -- internals --------------------------------------------------------------------------
    async def _session(self, plan: AgentPlan, script: SessionScript, t0: float) -> list[Outcome]:
        await asyncio.sleep(max(0.0, script.start_s - (time.perf_counter() - t0)))
        replies: list[str] = []
        outcomes: list[Outcome] = []
        for turn in range(1, script.turns + 1):
            if outcomes and not outcomes[-1].ok:
                outcomes.append(Outcome(kind="turn", id=script.id, turn=turn, error=f"skipped: turn {turn - 1} failed"))
                continue
            if turn > 1 and script.think_s[turn - 2] > 0:
                await asyncio.sleep(script.think_s[turn - 2])
            o = await self.chat(messages_for(plan, script, replies), plan.max_tokens, kind="turn", id=script.id,
                                turn=turn, session=script.id, t0=t0)  # fmt: skip
            outcomes.append(o)
            replies.append(o.text)
        return outcomes

    @staticmethod
    async def _at(at_s: float, t0: float, request: Any) -> Outcome:
        await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - t0)))
        return await request

    async def _stream(self, path: str, body: dict, headers: dict[str, str], out: Outcome, t0: float | None) -> Outcome:
        body = {**body, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        out.sent_s = start - t0 if t0 is not None else 0.0
        last: float | None = None
        finished = False
        try:
            async with aconnect_sse(self.http, "POST", path, json=body, headers=headers) as events:
                resp = events.response
                if resp.status_code != 200:
                    out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                    return out
                out.route = RouteStats.from_header(resp.headers.get(ROUTE_HEADER))
                async for event in events.aiter_sse():
                    if event.data.strip() == "[DONE]":
                        break
                    chunk = msgspec.json.decode(event.data)
                    if "error" in chunk:
                        out.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                        return out
                    for choice in chunk.get("choices") or []:
                        text = _choice_text(choice)
                        if text:
                            now = time.perf_counter()
                            if last is None:
                                out.ttft_s = now - start
                            else:
                                out.itl_s.append(now - last)
                            last = now
                            out.text += text
                            out.output_tokens += 1
                        finished = finished or choice.get("finish_reason") is not None
                    if chunk.get("usage"):
                        _read_usage(out, chunk["usage"])
        except (httpx.HTTPError, msgspec.DecodeError, ValueError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            return out
        out.e2e_s = time.perf_counter() - start
        if not finished:
            out.error = "the stream ended without a finish_reason"
        elif out.ttft_s is None:  # an empty reply: its first (and only) event is the finish
            out.ttft_s = out.e2e_s
        return out


def _choice_text(choice: dict) -> str:
    if "text" in choice:  # /v1/completions
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    if delta.get("tool_calls"):
        return msgspec.json.encode(delta["tool_calls"]).decode()
    return delta.get("content") or ""


def _read_usage(out: Outcome, usage: dict) -> None:
    out.prompt_tokens = usage.get("prompt_tokens") or 0
    out.output_tokens = usage.get("completion_tokens") or out.output_tokens
    details = usage.get("prompt_tokens_details")
    out.cache_reported = details is not None
    out.cached_tokens = (details or {}).get("cached_tokens") or 0
    if usage.get("agentkv"):
        out.agentkv = msgspec.convert(usage["agentkv"], RouteStats)
