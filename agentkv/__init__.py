"""agentkv: the SDK (over `openai`; docs/sdk.md) and the command line (`agentkv`).

    from agentkv import Client, tool

    with Client("http://127.0.0.1:8000") as client, client.session() as session:
        print(session.run("What is 2 + 3?", tools=[add]).content)  # add: a @tool function

Names are imported on first use: `openai` takes about a second to import, which `agentkv --help`
and the workers need not pay. The errors are openai's, re-exported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(("AsyncClient", "ChatResult", "Client", "Done", "SessionInfo", "TextDelta", "ToolCallEvent", "TurnStats"),
                    "agentkv.client"),
    **dict.fromkeys(("AsyncSession", "RunResult", "Session"), "agentkv.session"),
    **dict.fromkeys(("Tool", "ToolArgumentsError", "ToolCall", "ToolRegistry", "ToolResult", "tool"), "agentkv.tools"),
    **dict.fromkeys(("OpenAIError", "APIError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
                     "AuthenticationError", "PermissionDeniedError", "NotFoundError", "RateLimitError",
                     "InternalServerError"), "openai"),
}  # fmt: skip
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from openai import (APIConnectionError, APIError, APIStatusError, APITimeoutError, AuthenticationError, BadRequestError,
                        InternalServerError, NotFoundError, OpenAIError, PermissionDeniedError, RateLimitError)  # fmt: skip

    from agentkv.client import AsyncClient, ChatResult, Client, Done, SessionInfo, TextDelta, ToolCallEvent, TurnStats
    from agentkv.session import AsyncSession, RunResult, Session
    from agentkv.tools import Tool, ToolArgumentsError, ToolCall, ToolRegistry, ToolResult, tool


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agentkv' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
