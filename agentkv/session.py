"""A server-side agent session: the history, the tools, and the loop that runs them.

Every request carries the whole history (the wire format stays plain OpenAI) plus `X-Session-Id`,
so the gateway can continue the session's exact-token ledger and route the turn to the node that
still holds its KV blocks. The history is kept exactly as the server returned it (assistant
content and tool-call ids untouched): an edited history still works, but loses the exact-token
continuation. Keep `tools` and the system prompt the same across turns for the same reason: they
are rendered at the start of the prompt, so changing them invalidates the whole cached prefix.

`run()` is the agent loop: call the model, run the tools it asked for (concurrently), append the
results, repeat until it answers without tools. The last allowed step is sent with
`tool_choice="none"`, so a run always ends with an answer rather than a dangling tool call.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentkv.client import ChatResult, Done, Message, NotFoundError, StreamEvent, TurnStats
from agentkv.tools import Tool, ToolRegistry, ToolResult

if TYPE_CHECKING:
    from agentkv.client import AsyncClient, Client, SessionInfo

__all__ = ["AsyncSession", "RunResult", "Session"]

ToolFn = Tool | Callable[..., Any]  # a session's tools must be runnable: no bare JSON specs


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


class _SessionState:
    """History and bookkeeping shared by Session and AsyncSession (no I/O here)."""

    def __init__(self, id: str | None, *, system: str | None, tools: Iterable[ToolFn], ttl_s: float | None,
                 **defaults: Any) -> None:  # fmt: skip
        self.id = id
        self.ttl_s = ttl_s
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.tools = ToolRegistry(tools)
        self.defaults = defaults  # request parameters for every turn (max_tokens, temperature, ...)
        self.turns: list[TurnStats] = []

    def _ensure_id(self) -> str:
        if self.id is None:
            self.id = "sess_" + secrets.token_hex(12)  # the gateway creates it on first use
        return self.id

    def _add_user(self, content: str | list[dict[str, Any]] | None) -> None:
        if content is not None:
            self.messages.append({"role": "user", "content": content})

    def _registry(self, extra: Iterable[ToolFn] | None) -> ToolRegistry:
        """The session's tools plus this call's (sent to the model and runnable)."""
        if extra is None:
            return self.tools
        if isinstance(extra, ToolRegistry):
            return extra
        registry = ToolRegistry(self.tools)
        for t in extra:
            registry.add(t)
        return registry

    def _request(self, registry: ToolRegistry, tool_choice: Any, params: dict[str, Any]) -> dict[str, Any]:
        specs = registry.specs()
        kwargs = {**self.defaults, **params}
        if self.ttl_s is not None:
            kwargs.setdefault("session_ttl_s", self.ttl_s)
        return {"tools": specs or None, "tool_choice": tool_choice if specs else None, "session_id": self._ensure_id(), **kwargs}

    def _record(self, result: ChatResult) -> ChatResult:
        self.messages.append(result.message)
        self.turns.append(result.stats)
        return result

    def _add_results(self, results: list[ToolResult]) -> None:
        self.messages.extend(r.to_message() for r in results)

    @staticmethod
    def _choice(step: int, max_steps: int, first: Any) -> Any:
        if step == 0:
            return first if first is not None else "auto"
        return "none" if step == max_steps - 1 else "auto"

    def add_tool_results(self, results: Iterable[ToolResult]) -> None:
        """Append tool messages (when you run the tools yourself instead of `run()`)."""
        self._add_results(list(results))


class Session(_SessionState):
    """Blocking session; make one with `client.session(...)`. A context manager deletes it on exit."""

    def __init__(self, client: Client, id: str | None = None, *, system: str | None = None,
                 tools: Iterable[ToolFn] = (), ttl_s: float | None = None, create: bool = True,
                 **defaults: Any) -> None:  # fmt: skip
        super().__init__(id, system=system, tools=tools, ttl_s=ttl_s, **defaults)
        self.client = client
        if create:
            self.create()

    def create(self) -> SessionInfo:
        """Create the session on the server (its id is the server's when none was given)."""
        info = self.client.create_session(self.id, ttl_s=self.ttl_s)
        self.id = info.id
        return info

    def info(self) -> SessionInfo:
        return self.client.get_session(self._ensure_id())

    def delete(self) -> None:
        """Drop the session on the server: its pinned KV blocks are released."""
        if self.id is not None:
            try:
                self.client.delete_session(self.id)
            except NotFoundError:
                pass  # already expired or deleted

    def stream(self, content: str | list[dict[str, Any]] | None = None, *, tools: Iterable[ToolFn] | None = None,
               tool_choice: Any = None, **params: Any) -> Iterator[StreamEvent]:  # fmt: skip
        """Send `content` as a user message (None: just continue) and stream the reply.

        The reply joins the history when the stream ends (the Done event)."""
        self._add_user(content)
        request = self._request(self._registry(tools), tool_choice, params)
        for event in self.client.chat_stream(self.messages, **request):
            if isinstance(event, Done):
                self._record(event.result)
            yield event

    def chat(self, content: str | list[dict[str, Any]] | None = None, *, tools: Iterable[ToolFn] | None = None,
             tool_choice: Any = None, **params: Any) -> ChatResult:  # fmt: skip
        """One turn (streamed underneath, so its stats include TTFT); returns the assistant's reply."""
        result: ChatResult | None = None
        for event in self.stream(content, tools=tools, tool_choice=tool_choice, **params):
            if isinstance(event, Done):
                result = event.result
        assert result is not None  # chat_stream always ends with Done
        return result

    def run(self, prompt: str | None, tools: Iterable[ToolFn] | None = None, *, max_steps: int = 8,
            tool_choice: Any = None, **params: Any) -> RunResult:  # fmt: skip
        """The agent loop. `tool_choice` applies to the first step only (e.g. "required" or a tool
        name to force a call on a small model); later steps are "auto", the last "none"."""
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        registry = self._registry(tools)
        self._add_user(prompt)
        out = RunResult(content=None, finished=False)
        for step in range(max_steps):
            result = self.chat(tools=registry, tool_choice=self._choice(step, max_steps, tool_choice), **params)
            out.turns.append(result.stats)
            out.content = result.content
            if not result.tool_calls:
                out.finished = True
                return out
            results = registry.run(result.tool_calls)
            self._add_results(results)
            out.tool_results += results
        return out

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


class AsyncSession(_SessionState):
    """The asyncio twin of Session. `session = await client.session(...)` or
    `async with client.session(...) as session:` (created on the server, deleted on exit)."""

    def __init__(self, client: AsyncClient, id: str | None = None, *, system: str | None = None,
                 tools: Iterable[ToolFn] = (), ttl_s: float | None = None, create: bool = True,
                 **defaults: Any) -> None:  # fmt: skip
        super().__init__(id, system=system, tools=tools, ttl_s=ttl_s, **defaults)
        self.client = client
        self._pending_create = create

    async def create(self) -> SessionInfo:
        info = await self.client.create_session(self.id, ttl_s=self.ttl_s)
        self.id = info.id
        self._pending_create = False
        return info

    async def _ready(self) -> AsyncSession:
        if self._pending_create:
            await self.create()
        return self

    def __await__(self):
        return self._ready().__await__()

    async def info(self) -> SessionInfo:
        return await self.client.get_session(self._ensure_id())

    async def delete(self) -> None:
        if self.id is not None:
            try:
                await self.client.delete_session(self.id)
            except NotFoundError:
                pass

    async def stream(self, content: str | list[dict[str, Any]] | None = None, *, tools: Iterable[ToolFn] | None = None,
                     tool_choice: Any = None, **params: Any) -> AsyncIterator[StreamEvent]:  # fmt: skip
        await self._ready()
        self._add_user(content)
        request = self._request(self._registry(tools), tool_choice, params)
        async for event in self.client.chat_stream(self.messages, **request):
            if isinstance(event, Done):
                self._record(event.result)
            yield event

    async def chat(self, content: str | list[dict[str, Any]] | None = None, *, tools: Iterable[ToolFn] | None = None,
                   tool_choice: Any = None, **params: Any) -> ChatResult:  # fmt: skip
        result: ChatResult | None = None
        async for event in self.stream(content, tools=tools, tool_choice=tool_choice, **params):
            if isinstance(event, Done):
                result = event.result
        assert result is not None
        return result

    async def run(self, prompt: str | None, tools: Iterable[ToolFn] | None = None, *, max_steps: int = 8,
                  tool_choice: Any = None, **params: Any) -> RunResult:  # fmt: skip
        """Like Session.run; parallel calls run concurrently on the event loop."""
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        registry = self._registry(tools)
        self._add_user(prompt)
        out = RunResult(content=None, finished=False)
        for step in range(max_steps):
            result = await self.chat(tools=registry, tool_choice=self._choice(step, max_steps, tool_choice), **params)
            out.turns.append(result.stats)
            out.content = result.content
            if not result.tool_calls:
                out.finished = True
                return out
            results = await registry.arun(result.tool_calls)
            self._add_results(results)
            out.tool_results += results
        return out

    async def __aenter__(self) -> AsyncSession:
        return await self._ready()

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()
