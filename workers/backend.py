"""The engine interface: everything the worker's HTTP layer and KV publisher need from an engine.

The built-in engine (workers.builtin) is the first implementation; another engine (vLLM) plugs in
here without touching the gateway or the HTTP layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from kvstore.events import KVEvent
from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.wire import GenerateRequest, PrefillRequest, PrefillResult, TokenChunk


class InvalidRequest(ValueError):
    """The request cannot be run as given; `code` follows OpenAI's error codes where one exists."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


class Unavailable(RuntimeError):
    """The request cannot be served here now (shutting down, aborted); another node may serve it."""


@dataclass
class CacheSnapshot:
    """(hash, parent hash) of every block the engine serves, at one point of its event stream."""

    blocks: list[tuple[int, int | None]]


class WorkerEngine(Protocol):
    record: NodeRecord
    events: asyncio.Queue[list[KVEvent] | CacheSnapshot]  # KV event batches for the index, in order

    async def start(self) -> None: ...
    async def stop(self) -> None: ...  # let in-flight requests finish for a while, abort the rest, release all
    def load(self) -> NodeLoad: ...
    def stats(self) -> dict[str, Any]: ...  # engine-specific fields for the health endpoint
    def snapshot(self) -> None: ...  # queue a CacheSnapshot into `events` after all earlier events (resync)

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        """Admit the request (InvalidRequest if it cannot run), then stream it to its final chunk.

        With `req.remote_kv` the engine adopts the prefill node's KV itself; closing the stream
        before the final chunk aborts the request.
        """

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Compute the prompt's KV and hold it for the reader; only the engine ends the hold."""

    async def abort(self, request_id: str) -> None: ...  # stops a running request, a running prefill too
    async def unpin(self, session_key: str) -> int: ...  # releases a session's pinned blocks; how many
