"""The built-in engine behind the engine interface: Engine on its thread, plus disaggregation.

A prefill hold has one owner, the prefill node: it frees the held blocks when the reader's
completion notification arrives over the KV transport, or when the hold times out. Nobody else
releases them; abort stops a prefill only while it runs. The decode node reads only the blocks it
lacks (or, lacking none, just notifies), and on any failure computes the prompt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from redis.exceptions import RedisError

from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.registry import NodeRegistry
from kvstore.wire import GenerateRequest, PrefillRequest, PrefillResult, TokenChunk
from workers.backend import Unavailable
from workers.config import WorkerConfig
from workers.engine import AdoptedKV, Engine
from workers.engine_loop import EngineLoop
from workers.metrics import WorkerMetrics
from workers.pool import OutOfBlocks
from workers.transfer import KVTransport, TransferError, TransferTimeout, UnknownPeer

log = logging.getLogger("agentkv.worker")


class BuiltinEngine:
    def __init__(self, config: WorkerConfig, engine: Engine, generation: int, transport: KVTransport,
                 registry: NodeRegistry, metrics: WorkerMetrics):  # fmt: skip
        self.engine, self.transport, self.registry, self.metrics = engine, transport, registry, metrics
        self.transfer_timeout_s, self.drain_timeout_s = config.transfer_timeout_s, config.drain_timeout_s
        model, pool = engine.loaded, engine.pool
        self.record = NodeRecord(
            node_id=config.node_id, role=config.role, address=config.address, block_size=pool.block_size,
            model_fingerprint=model.fingerprint, capacity_blocks=pool.num_blocks, generation=generation,
            transfer_backend=config.transfer, transfer_metadata=transport.metadata(), started_at=time.time(),
            model_name=model.name, model_path=str(model.path), max_model_len=engine.max_model_len,
        )
        self.loop = EngineLoop(engine, on_step=metrics.step_seconds.observe)
        self.events = self.loop.events
        self.transfer_fallbacks = 0
        self._holds: dict[str, asyncio.TimerHandle] = {}  # prefill request id -> its timeout
        self._notifications: asyncio.Task | None = None

    async def start(self) -> None:
        self.loop.start()
        self._notifications = asyncio.create_task(self._release_on_notification(), name="kv-notifications")

    async def stop(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.loop.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.loop.streams:
            await asyncio.gather(*(self.loop.abort(rid, "the worker is shutting down; the request was aborted")
                                   for rid in list(self.loop.streams)))  # fmt: skip
            await asyncio.sleep(0.2)  # let the final chunks reach their streams
        if self._notifications is not None:
            self._notifications.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifications
        self.loop.stop()
        self.transport.close()

    def load(self) -> NodeLoad:
        sched, pool = self.engine.scheduler, self.engine.pool
        return NodeLoad(len(sched.running), len(sched.waiting), free_blocks=pool.num_free, total_blocks=pool.num_blocks)

    def stats(self) -> dict[str, Any]:
        c = self.engine.config  # the scheduler's settings, as the node runs them
        scheduler = {"itl_slowdown": c.itl_slowdown, "mixed_prefill_tokens": c.mixed_prefill_tokens, "short_prompt_tokens": c.short_prompt_tokens}
        return {"transfer": self.transport.counters.snapshot(), "transfer_fallbacks": self.transfer_fallbacks, "scheduler": scheduler}

    def snapshot(self) -> None:
        self.loop.snapshot()

    async def abort(self, request_id: str) -> None:
        await self.loop.abort(request_id, error="aborted by the gateway")

    async def unpin(self, session_key: str) -> int:
        return await self.loop.call(lambda e: e.pool.unpin(session_key))

    # -- decode --------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        hashes, adopted, remote = req.block_hashes, None, req.remote_kv
        if remote is not None and remote.node_id == self.record.node_id:
            self._release(remote.request_id)  # prefilled here: the blocks are cache hits already
        elif remote is not None:
            hashes = self.engine.prompt_hashes(req.prompt_token_ids, req.hash_salt, req.block_hashes)
            adopted = await self._pull(req, hashes)
        rid = req.request_id
        chunks = await self.loop.submit(
            rid,
            lambda e: e.add_request(
                rid, req.prompt_token_ids, req.sampling, session_id=req.session_id, pin_ttl_s=req.pin_ttl_s,
                hash_salt=req.hash_salt, block_hashes=hashes, adopted=adopted,
            ),
        )
        return self._stream(rid, chunks)

    async def _stream(self, request_id: str, chunks: asyncio.Queue[TokenChunk]) -> AsyncGenerator[TokenChunk, None]:
        finished = False
        try:
            while not finished:
                chunk = await chunks.get()
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:  # the consumer went away: free the blocks now
                self.loop.abort(request_id)

    async def _pull(self, req: GenerateRequest, hashes: list[int]) -> AdoptedKV | None:
        """Read from the prefill node only the blocks this pool lacks; None means "compute here".

        Our own cached leading blocks are referenced first (so nothing evicts them meanwhile), the
        rest are allocated and filled by one read. Any failure releases what we took and falls back
        to computing locally: a slower answer, never a wrong one.
        """
        remote = req.remote_kv
        n = len(remote.block_ids)

        def reserve(engine: Engine) -> tuple[list[int], list[int]]:
            engine.validate(req.prompt_token_ids, req.sampling)
            own = engine.pool.cached_prefix(hashes[: remote.num_computed // engine.pool.block_size])[:n]
            engine.pool.acquire(own)
            try:
                return own, engine.pool.allocate(n - len(own))
            except OutOfBlocks:
                engine.pool.release(own)
                raise

        try:
            own, fresh = await self.loop.call(reserve)
        except OutOfBlocks as exc:
            return self._fallback(remote, f"no room for the transfer ({exc})")
        notif = remote.request_id.encode()
        try:
            await self._add_peer(remote)
            if fresh:
                await self.transport.read(
                    remote.node_id, remote.block_ids[len(own) :], fresh, notif=notif, timeout_s=self.transfer_timeout_s
                )
            else:  # every block is here already: only tell the owner to let go
                self.transport.notify(remote.node_id, notif)
        except TransferError as exc:
            in_flight = isinstance(exc, TransferTimeout) and exc.in_flight  # may still be written: never reuse
            await self.loop.call(lambda e: e.pool.release(own if in_flight else own + fresh))
            return self._fallback(remote, str(exc))
        return AdoptedKV(own + fresh, remote.num_computed, remote.first_token, remote.first_logprob, local_blocks=len(own))

    def _fallback(self, remote: PrefillResult, why: str) -> None:
        log.warning("KV transfer from %s failed, recomputing locally: %s", remote.node_id, why)
        self.metrics.transfer_fallbacks.inc()
        self.transfer_fallbacks += 1

    async def _add_peer(self, remote: PrefillResult) -> None:
        """Load the sender as the registry knows it: its metadata is unpickled, so never take it from a request."""
        if self.transport.peers().get(remote.node_id) == remote.generation:
            return
        try:
            record = await self.registry.get(remote.node_id)
        except (RedisError, OSError) as exc:
            raise UnknownPeer(f"registry unreachable: {exc}") from exc
        if record is None or record.generation != remote.generation:
            raise UnknownPeer(f"node {remote.node_id} (generation {remote.generation}) is not registered")
        self.transport.add_peer(record.node_id, record.generation, record.transfer_metadata)

    # -- prefill -------------------------------------------------------------------------------
    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        rid = req.request_id
        first_only = msgspec.structs.replace(req.sampling, max_tokens=1, ignore_eos=True, logprobs=True)
        chunks = await self.loop.submit(
            rid,
            lambda e: e.add_request(
                rid, req.prompt_token_ids, first_only, hash_salt=req.hash_salt, block_hashes=req.block_hashes, hold_blocks=True
            ),
        )
        final = await chunks.get()
        if final.finish_reason in ("abort", "error"):
            raise Unavailable(final.error or "the prefill was aborted")
        blocks = await self.loop.call(lambda e: e.held.get(rid, []))
        self._holds[rid] = asyncio.get_running_loop().call_later(req.hold_timeout_s, self._release, rid)
        return PrefillResult(
            request_id=rid, node_id=self.record.node_id, generation=self.record.generation, block_ids=blocks,
            num_computed=len(req.prompt_token_ids), first_token=final.token_ids[0], first_logprob=(final.logprobs or [0.0])[0],
            prompt_tokens=final.prompt_tokens, cached_tokens=final.cached_tokens,
        )

    async def _release_on_notification(self) -> None:
        async for notif in self.transport.notifications():
            self._release(notif.decode(errors="replace"))

    def _release(self, request_id: str) -> None:
        """End a prefill hold (the reader is done, or the hold timed out): the only place one ends."""
        timer = self._holds.pop(request_id, None)
        if timer is not None:
            timer.cancel()
            self.loop.call(lambda e: e.pool.release(e.held.pop(request_id, [])))
