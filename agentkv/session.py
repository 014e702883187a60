"""A server-side agent session: the history, the tools, and the loop that runs them.

Every request carries the whole history (plain OpenAI) plus `X-Session-Id`, so the gateway extends
the session's exact-token ledger and routes the turn to the node holding its KV blocks. Keep the
history as the server returned it and the system prompt and tools unchanged: they open the prompt,
and any edit costs the cache from that point on.

`run()` is the agent loop: call the model, run the tools it asked for (concurrently), append the
results, repeat until it answers without tools; the last allowed step is sent with
`tool_choice="none"`, so a run ends with an answer. Written once as steps (agentkv/client.py): on
an AsyncClient every method returns an awaitable.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openai import NotFoundError

from agentkv.tools import Tool, ToolRegistry, ToolResult

if TYPE_CHECKING:
    from agentkv.client import ChatResult, Steps, StreamEvent, TurnStats

__all__ = ["AsyncSession", "RunResult", "Session"]

ToolFn = Tool | Callable[..., Any]  # a session's tools must be runnable: no bare JSON specs
Content = str | list[dict[str, Any]] | None


@dataclass
class RunResult:
    """The outcome of `run()`: the final answer, every tool result, one TurnStats per model call."""

    content: str | None
    tool_results: list[ToolResult] = field(default_factory=list)
    turns: list[TurnStats] = field(default_factory=list)
    finished: bool = True  # False: max_steps ran out while the model still asked for tools

    @property
    def steps(self) -> int:
        return len(self.turns)


class Session:
    """Make one with `client.session(...)`; a context manager that deletes it on exit."""

    def __init__(self, client: Any, id: str | None = None, *, system: str | None = None, tools: Iterable[ToolFn] = (),
                 ttl_s: float | None = None, create: bool = True, **defaults: Any) -> None:  # fmt: skip
        self.client = client
        self.id = id
        self.ttl_s = ttl_s
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.tools = ToolRegistry(tools)
        self.defaults = defaults  # request parameters for every turn (max_tokens, temperature, ...)
        self.turns: list[TurnStats] = []
        self.pending = create  # still to be created on the server

    def info(self) -> Any:
        """The gateway's SessionInfo (turns and token totals)."""
        if self.id is None:
            raise ValueError("this session has no id yet: the gateway names it on its first call")
        return self.client.get_session(self.id)

    def delete(self) -> Any:
        """Drop the session on the server: its pinned KV blocks are released."""
        return self.client._drive(self._delete())

    def chat(self, content: Content = None, *, tools: Iterable[ToolFn] | None = None, tool_choice: Any = None, **params: Any) -> Any:
        """Send `content` as a user message (None: just continue) and return the reply, a ChatResult
        (streamed underneath, so its stats include TTFT); the reply joins the history."""
        return self.client._drive(self._chat(content, self._registry(tools), tool_choice, params))

    def run(self, prompt: Content, tools: Iterable[ToolFn] | None = None, *, max_steps: int = 8, tool_choice: Any = None,
            **params: Any) -> Any:  # fmt: skip
        """The agent loop -> RunResult. `tool_choice` applies to the first step only (e.g. "required"
        or a tool name to force a call on a small model); later steps are "auto", the last "none"."""
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        return self.client._drive(self._run(prompt, tools, max_steps, tool_choice, params))

    def stream(self, content: Content = None, *, tools: Iterable[ToolFn] | None = None, tool_choice: Any = None,
               **params: Any) -> Iterator[StreamEvent]:  # fmt: skip
        """chat() as events; the message and the reply join the history at Done."""
        request = self._request(self._registry(tools), tool_choice, params)
        for event in self.client.chat_stream(self._outgoing(content), **request):
            yield self._record_done(content, event)

    def add_tool_results(self, results: Iterable[ToolResult]) -> None:
        """Append tool messages (when you run the tools yourself instead of `run()`)."""
        self.messages.extend(r.to_message() for r in results)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # -- steps (see agentkv/client.py) ---------------------------------------------------
    def _delete(self) -> Steps:
        if self.id is not None:
            try:
                yield self.client.delete_session(self.id)
            except NotFoundError:
                pass  # already expired or deleted

    def _ready(self) -> Steps:
        """Create the session on the server if still pending (the id is the server's if none was given)."""
        if self.pending:
            info = yield self.client.create_session(self.id, ttl_s=self.ttl_s)
            self.id, self.pending = info.id, False
        return self

    def _chat(self, content: Content, registry: ToolRegistry, tool_choice: Any, params: dict[str, Any]) -> Steps:
        yield from self._ready()
        result = yield from self.client._turn(self._outgoing(content), stream=True, **self._request(registry, tool_choice, params))
        self._record(content, result)
        return result

    def _run(self, prompt: Content, tools: Iterable[ToolFn] | None, max_steps: int, first_choice: Any, params: dict[str, Any]) -> Steps:
        out, registry = RunResult(content=None, finished=False), self._registry(tools)
        for step in range(max_steps):
            choice = "none" if step == max_steps - 1 else (first_choice or "auto") if step == 0 else "auto"
            result = yield from self._chat(prompt if step == 0 else None, registry, choice, params)
            out.turns.append(result.stats)
            out.content = result.content
            if not result.tool_calls:
                out.finished = True
                break
            results = yield self.client._run_tools(registry, result.tool_calls)
            self.add_tool_results(results)
            out.tool_results += results
        return out

    # -- plumbing ------------------------------------------------------------------------
    def _registry(self, extra: Iterable[ToolFn] | None) -> ToolRegistry:
        """The session's tools plus this call's (sent to the model and runnable)."""
        return ToolRegistry([*self.tools.values(), *(extra or ())])

    def _outgoing(self, content: Content) -> list[dict[str, Any]]:
        """The history plus the new user message (None: none). It joins the history with the reply, so
        a call that fails leaves the history as it was, ready for a retry."""
        return self.messages + ([{"role": "user", "content": content}] if content is not None else [])

    def _request(self, registry: ToolRegistry, tool_choice: Any, params: dict[str, Any]) -> dict[str, Any]:
        """The next call's keywords."""
        self.id = self.id or "sess_" + secrets.token_hex(12)  # not created yet: the gateway creates it on first use
        specs = registry.specs()
        if not specs and tool_choice not in (None, "auto", "none"):
            raise ValueError(f"tool_choice={tool_choice!r} needs tools: pass tools=[...] to the session or this call")
        ttl = {} if self.ttl_s is None else {"session_ttl_s": self.ttl_s}
        return {**ttl, **self.defaults, **params, "session_id": self.id, "tools": specs or None, "tool_choice": tool_choice if specs else None}

    def _record(self, content: Content, result: ChatResult) -> None:
        if content is not None:
            self.messages.append({"role": "user", "content": content})
        self.messages.append(result.message)
        self.turns.append(result.stats)

    def _record_done(self, content: Content, event: StreamEvent) -> StreamEvent:
        if hasattr(event, "result"):  # Done
            self._record(content, event.result)
        return event


class AsyncSession(Session):
    """A Session on an AsyncClient: the same methods, awaitable. `await client.session(...)` or
    `async with client.session(...) as s:` creates it on the server; else its first call does."""

    def __await__(self):
        return self.client._drive(self._ready()).__await__()

    async def __aenter__(self) -> AsyncSession:
        return await self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def stream(self, content: Content = None, *, tools: Iterable[ToolFn] | None = None, tool_choice: Any = None,
                     **params: Any) -> AsyncIterator[StreamEvent]:  # fmt: skip
        await self
        async for event in self.client.chat_stream(self._outgoing(content), **self._request(self._registry(tools), tool_choice, params)):
            yield self._record_done(content, event)
