"""Keeps the node's entry in Redis true: registration, heartbeat with live load, KV events.

Redis is an index, not a dependency of serving: when it goes away the worker keeps serving and
this task keeps retrying. When it comes back (or the heartbeat says our record expired), the node
registers again and replaces its whole entry with a snapshot of the pool taken at a known point
of the event stream, so the index is exact again: no stale and no missing blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from kvstore.events import KVEventBatch
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.registry import NodeRegistry
from workers.engine_loop import CacheSnapshot, EngineLoop

log = logging.getLogger("agentkv.worker")


class KVPublisher:
    def __init__(
        self,
        record: NodeRecord,
        registry: NodeRegistry,
        index: BlockIndex,
        engine_loop: EngineLoop,
        load: Callable[[], NodeLoad],
        ttl_s: float = 3.0,
        heartbeat_s: float = 0.5,
    ):
        self.record = record
        self.registry = registry
        self.index = index
        self.engine_loop = engine_loop
        self.load = load
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.needs_resync = True
        self.connected = False
        self.resyncs = 0
        self.events_applied = 0

    async def run(self) -> None:
        next_beat = 0.0
        while True:
            try:
                if self.needs_resync:
                    await self._resync()
                await self._publish_pending(timeout=max(0.0, next_beat - time.monotonic()))
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    if not await self.registry.heartbeat(self.record.node_id, self.record.generation, self.load(), self.ttl_s):
                        self.needs_resync = True
                if not self.connected:
                    log.info("registered node %s (generation %s)", self.record.node_id, self.record.generation)
                self.connected = True
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("lost Redis (%s); serving on, will resync when it returns", exc)
                self.connected = False
                self.needs_resync = True
                await asyncio.sleep(0.5)

    async def _publish_pending(self, timeout: float) -> None:
        """Apply every queued event batch in one pipelined batch (waits up to `timeout` for one)."""
        try:
            first = await asyncio.wait_for(self.engine_loop.events.get(), timeout=timeout) if timeout > 0 else self.engine_loop.events.get_nowait()
        except (asyncio.TimeoutError, asyncio.QueueEmpty):
            return
        events = []
        item = first
        while True:
            if isinstance(item, CacheSnapshot):  # a stale snapshot (resync already done): skip
                pass
            else:
                events.extend(item)
            try:
                item = self.engine_loop.events.get_nowait()
            except asyncio.QueueEmpty:
                break
        if events:
            batch = KVEventBatch(self.record.node_id, self.record.generation, events)
            if not await self.index.apply(batch):
                self.needs_resync = True
            else:
                self.events_applied += len(events)

    async def _resync(self) -> None:
        await self.registry.register(self.record, self.ttl_s, self.load())
        self.engine_loop.snapshot()
        while True:  # everything before the snapshot is already in it
            item = await asyncio.wait_for(self.engine_loop.events.get(), timeout=30)
            if isinstance(item, CacheSnapshot):
                break
        await self.index.resync(self.record.node_id, self.record.generation, item.blocks)
        self.needs_resync = False
        self.resyncs += 1

    async def deregister(self) -> None:
        try:
            await self.registry.deregister(self.record.node_id, self.record.generation)
            await self.index.purge_node(self.record.node_id, self.record.generation)
        except (RedisError, OSError) as exc:
            log.warning("could not deregister from Redis: %s", exc)
