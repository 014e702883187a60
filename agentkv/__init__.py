"""agentkv: the SDK and the command line (`agentkv`).

    from agentkv import Client, tool

    @tool
    def add(a: int, b: int) -> int:
        "Add two integers."
        return a + b

    with Client("http://127.0.0.1:8000") as client, client.session() as session:
        print(session.run("What is 2 + 3?", tools=[add]).content)

Imports are lazy so `agentkv --help` and the workers do not pay for the SDK's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "agentkv.client", "AsyncClient": "agentkv.client", "ChatResult": "agentkv.client",
    "TurnStats": "agentkv.client", "AgentKVError": "agentkv.client", "APIStatusError": "agentkv.client",
    "Session": "agentkv.session", "AsyncSession": "agentkv.session", "RunResult": "agentkv.session",
    "tool": "agentkv.tools", "Tool": "agentkv.tools", "ToolCall": "agentkv.tools", "ToolResult": "agentkv.tools",
}  # fmt: skip
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from agentkv.client import AgentKVError, APIStatusError, AsyncClient, ChatResult, Client, TurnStats
    from agentkv.session import AsyncSession, RunResult, Session
    from agentkv.tools import Tool, ToolCall, ToolResult, tool


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentkv' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
