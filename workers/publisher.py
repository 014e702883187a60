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

from redis.exceptions import RedisError

from kvstore.events import KVEventBatch
from kvstore.index import BlockIndex
from kvstore.registry import NodeRegistry
from workers.backend import CacheSnapshot, WorkerEngine

log = logging.getLogger("agentkv.worker")


class KVPublisher:
    def __init__(self, engine: WorkerEngine, registry: NodeRegistry, index: BlockIndex, ttl_s: float = 3.0,
                 heartbeat_s: float = 0.5):  # fmt: skip
        self.engine, self.registry, self.index = engine, registry, index
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.needs_resync = True
        self.connected = False

    async def run(self) -> None:
        record = self.engine.record
        next_beat = 0.0
        while True:
            try:
                if self.needs_resync:
                    await self._resync()
                await self._publish_pending(timeout=next_beat - time.monotonic())
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    if not await self.registry.heartbeat(record.node_id, record.generation, self.engine.load(), self.ttl_s):
                        self.needs_resync = True
                if not self.connected:
                    log.info("registered node %s (generation %s)", record.node_id, record.generation)
                self.connected = True
            except (RedisError, OSError) as exc:  # OSError includes TimeoutError
                if self.connected:
                    log.warning("lost Redis (%s); serving on, will resync when it returns", exc)
                self.connected = False
                self.needs_resync = True
                await asyncio.sleep(0.5)

    async def _publish_pending(self, timeout: float) -> None:
        """Apply every queued event batch in one index call (waits up to `timeout` for the first)."""
        queue, record = self.engine.events, self.engine.record
        try:
            items = [await asyncio.wait_for(queue.get(), max(timeout, 0.0))]
        except TimeoutError:
            return
        while not queue.empty():
            items.append(queue.get_nowait())
        # A snapshot here is stale (its resync is done): skip it.
        events = [event for item in items if not isinstance(item, CacheSnapshot) for event in item]
        if events and not await self.index.apply(KVEventBatch(record.node_id, record.generation, events)):
            self.needs_resync = True

    async def _resync(self) -> None:
        record = self.engine.record
        await self.registry.register(record, self.ttl_s, self.engine.load())
        self.engine.snapshot()
        # everything before the snapshot is already in it
        while not isinstance(item := await asyncio.wait_for(self.engine.events.get(), timeout=30), CacheSnapshot):
            pass
        await self.index.resync(record.node_id, record.generation, item.blocks)
        self.needs_resync = False

    async def deregister(self) -> None:
        record = self.engine.record
        try:
            await self.registry.deregister(record.node_id, record.generation)
            await self.index.purge_node(record.node_id, record.generation)
        except (RedisError, OSError) as exc:
            log.warning("could not deregister from Redis: %s", exc)
