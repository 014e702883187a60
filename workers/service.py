"""The worker process: the engine behind an internal HTTP API, registered in the Redis index.

Endpoints (all but health and metrics need the cluster token when one is configured):
  GET  /internal/health                 status, node id, generation, role, live load
  GET  /internal/info                   the NodeRecord
  POST /internal/generate               GenerateRequest -> NDJSON stream of TokenChunk
  POST /internal/prefill                PrefillRequest -> PrefillResult (blocks held for the reader)
  POST /internal/release/{request_id}   drop a prefill hold (the decode node has read the blocks)
  POST /internal/abort/{request_id}     stop a request and free its blocks
  POST /internal/sessions/{id}/unpin    release a session's pinned blocks
  GET  /metrics                         Prometheus
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException, ServiceUnavailableException
from litestar.handlers import BaseRouteHandler
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.wire import ErrorBody, GenerateRequest, PrefillRequest, PrefillResult, SamplingParams, TokenChunk
from workers.pool import OutOfBlocks
from kvstore.registry import NodeRegistry
from workers.transfer import KVTransport, TransferError, TransferTimeout
from kvstore.valkey import connect
from workers.engine import AdoptedKV, Engine, InvalidRequest
from workers.engine_loop import EngineLoop
from workers.metrics import WorkerMetrics
from workers.publisher import KVPublisher

log = logging.getLogger("agentkv.worker")
TOKEN_HEADER = "x-agentkv-token"
_encode = msgspec.json.Encoder().encode


@dataclass
class WorkerConfig:
    redis_url: str
    role: Role = Role.BOTH
    host: str = "127.0.0.1"
    port: int = 8101
    node_id: str = ""
    model: str = "smollm2"
    block_size: int = 16
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 64
    threads: int | None = None
    cpus: list[int] = field(default_factory=list)
    cluster_token: str | None = None
    transfer: str = "nixl"
    transfer_timeout_s: float = 10.0
    heartbeat_ttl_s: float = 3.0
    drain_timeout_s: float = 5.0
    advertise_host: str | None = None

    def __post_init__(self) -> None:
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}-{self.role.value}-{self.port}"

    @property
    def address(self) -> str:
        return f"http://{self.advertise_host or self.host}:{self.port}"


class PeerUnavailable(RuntimeError):
    """The node named as the KV source cannot be reached or is not (or no longer) registered."""


class Worker:
    """Everything the handlers share; built in the lifespan, so nothing is a module global."""

    def __init__(self, config: WorkerConfig, engine: Engine, generation: int, transport: KVTransport | None = None):
        self.config = config
        self.engine = engine
        self.transport = transport
        self.metrics = WorkerMetrics()
        self.draining = False
        self.record = NodeRecord(
            node_id=config.node_id,
            role=config.role,
            address=config.address,
            block_size=engine.pool.block_size,
            model_fingerprint=engine.loaded.fingerprint,
            capacity_blocks=engine.pool.num_blocks,
            generation=generation,
            transfer_backend=config.transfer,
            transfer_metadata=transport.metadata() if transport else b"",
            started_at=time.time(),
            model_name=engine.loaded.name,
            model_path=str(engine.loaded.path),
            max_model_len=engine.max_model_len,
        )
        self.loop: EngineLoop | None = None
        self.publisher: KVPublisher | None = None
        self.registry: NodeRegistry | None = None
        self.transfer_fallbacks = 0

    def load(self) -> NodeLoad:
        e = self.engine
        return NodeLoad(running=e.num_running, waiting=e.num_waiting, free_blocks=e.pool.num_free, total_blocks=e.pool.num_blocks)

    def on_step(self, seconds: float, _chunks: int) -> None:
        self.metrics.step_seconds.observe(seconds)

    # -- requests --------------------------------------------------------------------------
    async def start_generate(self, req: GenerateRequest) -> asyncio.Queue[TokenChunk]:
        self._check_accepting()
        self.metrics.prompt_tokens.inc(len(req.prompt_token_ids))
        adopted = None
        if req.remote_kv is not None and req.remote_kv.node_id != self.record.node_id:
            adopted = await self.pull_remote_kv(req)
        return await self.loop.submit(
            req.request_id,
            lambda e: e.add_request(
                req.request_id, req.prompt_token_ids, req.sampling,
                session_id=req.session_id, pin_ttl_s=req.pin_ttl_s, hash_salt=req.hash_salt, adopted=adopted,
            ),
        )

    async def pull_remote_kv(self, req: GenerateRequest) -> AdoptedKV | None:
        """Read from the prefill node only the blocks this pool lacks; None means "prefill here".

        Our own cached leading blocks are referenced first (so nothing evicts them meanwhile), the
        rest are reserved and filled by one transfer. Any failure (dead peer, timeout, no blocks,
        unknown node) releases what we took and falls back to computing locally: a slower answer,
        never a wrong one.
        """
        remote = req.remote_kv
        n = len(remote.block_ids)

        def reserve(engine: Engine) -> tuple[list[int], list[int]]:
            engine.validate(req.prompt_token_ids, req.sampling)
            own = engine.cached_prefix_blocks(req.prompt_token_ids[: remote.num_computed], req.hash_salt)[:n]
            engine.pool.acquire(own)
            try:
                return own, engine.reserve_blocks(n - len(own))
            except OutOfBlocks:
                engine.pool.release(own)
                raise

        try:
            own, fresh = await self.loop.call(reserve)
        except OutOfBlocks as exc:
            return self._fallback(remote, f"no room for the transfer ({exc})")
        try:
            if fresh:
                await self._load_peer(remote)
                # NIXL may copy inside read() itself (~90 ms for 1024 blocks): keep it off the event loop.
                handle = await asyncio.to_thread(
                    self.transport.read, remote.node_id, remote.block_ids[len(own) :], fresh,
                    notif=req.request_id.encode(), timeout_s=self.config.transfer_timeout_s,
                )
                await handle.wait_async()
            else:  # everything was local already: no read, so tell the prefill node to let go
                await self._release_remote(remote)
        except (TransferError, PeerUnavailable) as exc:
            leaked = isinstance(exc, TransferTimeout) and exc.in_flight
            await self.loop.call(lambda e: e.pool.release(own if leaked else own + fresh))
            return self._fallback(remote, str(exc))
        return AdoptedKV(
            block_ids=own + fresh, num_computed=remote.num_computed, first_token=remote.first_token,
            first_logprob=remote.first_logprob, local_blocks=len(own),
        )

    def _fallback(self, remote: PrefillResult, why: str) -> None:
        log.warning("KV transfer from %s failed, recomputing locally: %s", remote.node_id, why)
        self.metrics.transfer_fallbacks.inc()
        self.transfer_fallbacks += 1
        return None

    async def _peer_record(self, remote: PrefillResult) -> NodeRecord:
        """The sender as the registry knows it; metadata from anywhere else is never loaded."""
        if self.transport is None or self.registry is None:
            raise PeerUnavailable("this worker has no transport")
        try:
            record = await self.registry.get(remote.node_id)
        except (RedisError, OSError) as exc:
            raise PeerUnavailable(f"registry unreachable: {exc}") from exc
        if record is None or record.generation != remote.generation:
            raise PeerUnavailable(f"node {remote.node_id} (generation {remote.generation}) is not registered")
        return record

    async def _load_peer(self, remote: PrefillResult) -> None:
        if self.transport.peers().get(remote.node_id) == remote.generation:
            return
        record = await self._peer_record(remote)
        self.transport.add_peer(record.node_id, record.generation, record.transfer_metadata)

    async def _release_remote(self, remote: PrefillResult) -> None:
        record = await self._peer_record(remote)
        headers = {TOKEN_HEADER: self.config.cluster_token} if self.config.cluster_token else {}
        async with httpx.AsyncClient(timeout=5) as client:
            await client.post(f"{record.address}/internal/release/{remote.request_id}", headers=headers)

    async def release_on_read(self) -> None:
        """Prefill side: a decode node's read notification ends the hold on those blocks."""
        while True:
            for note in self.transport.take_notifs():
                if note.op == "read":
                    self.release(note.notif.decode())
            await asyncio.sleep(0.01)

    async def stream(self, request_id: str, chunks: asyncio.Queue[TokenChunk]) -> AsyncIterator[bytes]:
        """NDJSON lines until the final chunk; a consumer that goes away aborts the request."""
        finished = False
        try:
            while not finished:
                chunk = await chunks.get()
                finished = chunk.finished
                if finished:
                    self._account(chunk)
                yield _encode(chunk) + b"\n"
        finally:
            if not finished:  # client disconnected (or we were cancelled): free the blocks now
                self.loop.abort(request_id)
                self.metrics.requests.labels("abort").inc()

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        self._check_accepting()
        s = req.sampling
        first_only = SamplingParams(
            max_tokens=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed, ignore_eos=True, logprobs=True
        )
        rid = req.request_id
        chunks = await self.loop.submit(
            rid, lambda e: e.add_request(rid, req.prompt_token_ids, first_only, hash_salt=req.hash_salt, hold_blocks=True)
        )
        final = await chunks.get()
        if final.finish_reason in ("abort", "error"):
            raise ServiceUnavailableException(final.error or "prefill aborted")
        self._account(final)
        blocks = await self.loop.call(lambda e: e.held_blocks(rid))
        asyncio.get_running_loop().call_later(req.hold_timeout_s, self.release, rid)
        return PrefillResult(
            request_id=rid,
            node_id=self.record.node_id,
            generation=self.record.generation,
            block_ids=blocks,
            num_computed=len(req.prompt_token_ids),
            first_token=final.token_ids[0],
            first_logprob=(final.logprobs or [0.0])[0],
            prompt_tokens=final.prompt_tokens,
            cached_tokens=final.cached_tokens,
        )

    def release(self, request_id: str) -> asyncio.Future:
        return self.loop.call(lambda e: e.release_held(request_id))

    def _check_accepting(self) -> None:
        if self.draining:
            raise ServiceUnavailableException("this worker is shutting down; retry on another node")

    def _account(self, final: TokenChunk) -> None:
        m = self.metrics
        m.requests.labels(final.finish_reason or "unknown").inc()
        m.cached_tokens.inc(final.cached_tokens)
        m.generated_tokens.inc(final.completion_tokens)
        m.transferred_blocks.inc(final.transferred_blocks)
        m.transferred_bytes.inc(final.transferred_bytes)

    async def drain(self) -> None:
        """Stop accepting; let in-flight requests finish for a while, then abort the rest loudly."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.loop.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.loop.in_flight:
            for rid in self.loop.in_flight:
                self.loop.abort(rid, error="the worker is shutting down; the request was aborted")
            await asyncio.sleep(0.2)  # let the final chunks reach their streams


# -- HTTP layer -------------------------------------------------------------------------------
def _worker(request: Request) -> Worker:
    return request.app.state.worker


def token_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    expected = connection.app.state.worker.config.cluster_token
    if expected and connection.headers.get(TOKEN_HEADER) != expected:
        raise NotAuthorizedException("missing or wrong cluster token")


@get("/internal/health", sync_to_thread=False)
def health(worker: Worker) -> dict:
    return {
        "status": "draining" if worker.draining else "ok",
        "node_id": worker.record.node_id,
        "generation": worker.record.generation,
        "role": worker.record.role.value,
        "load": msgspec.to_builtins(worker.load()),
        "redis_connected": bool(worker.publisher and worker.publisher.connected),
        "transfer": worker.transport.counters.snapshot() if worker.transport else None,
        "transfer_fallbacks": worker.transfer_fallbacks,
    }


@get("/internal/info", guards=[token_guard], sync_to_thread=False)
def info(worker: Worker) -> NodeRecord:
    return worker.record


@post("/internal/generate", guards=[token_guard], status_code=200)
async def generate(data: GenerateRequest, worker: Worker) -> Stream:
    chunks = await worker.start_generate(data)
    return Stream(worker.stream(data.request_id, chunks), media_type="application/x-ndjson")


@post("/internal/prefill", guards=[token_guard], status_code=200)
async def prefill(data: PrefillRequest, worker: Worker) -> PrefillResult:
    return await worker.prefill(data)


@post("/internal/release/{request_id:str}", guards=[token_guard], status_code=204)
async def release(request_id: str, worker: Worker) -> None:
    await worker.release(request_id)


@post("/internal/abort/{request_id:str}", guards=[token_guard], status_code=204)
async def abort(request_id: str, worker: Worker) -> None:
    await worker.loop.abort(request_id, error="aborted by the gateway")


@post("/internal/sessions/{session_id:str}/unpin", guards=[token_guard], status_code=200)
async def unpin(session_id: str, worker: Worker) -> dict:
    released = await worker.loop.call(lambda e: e.pool.unpin(session_id))
    return {"session_id": session_id, "released": released}


@get("/metrics", sync_to_thread=False)
def metrics(worker: Worker) -> Response:
    m, load = worker.metrics, worker.load()
    m.running.set(load.running)
    m.waiting.set(load.waiting)
    m.free_blocks.set(load.free_blocks)
    m.redis_connected.set(1 if worker.publisher and worker.publisher.connected else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


def _invalid_request(_: Request, exc: InvalidRequest) -> Response:
    return Response(ErrorBody(message=str(exc), code=exc.code, param=exc.param), status_code=400)


def create_app(config: WorkerConfig, engine: Engine, generation: int, transport: KVTransport | None = None) -> Litestar:
    worker = Worker(config, engine, generation, transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = await connect(config.redis_url)
        registry = worker.registry = NodeRegistry(redis)
        worker.loop = EngineLoop(engine, asyncio.get_running_loop(), on_step=worker.on_step)
        worker.loop.start()
        worker.publisher = KVPublisher(
            worker.record, registry, BlockIndex(redis, registry=registry), worker.loop, worker.load,
            ttl_s=config.heartbeat_ttl_s,
        )
        tasks = [asyncio.create_task(worker.publisher.run(), name="kv-publisher")]
        if worker.transport is not None:
            tasks.append(asyncio.create_task(worker.release_on_read(), name="transfer-notifications"))
        try:
            yield
        finally:
            await worker.drain()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await worker.publisher.deregister()
            worker.loop.stop()
            if worker.transport is not None:
                worker.transport.close()
            await redis.aclose()

    return Litestar(
        route_handlers=[health, info, generate, prefill, release, abort, unpin, metrics],
        dependencies={"worker": Provide(_worker, sync_to_thread=False)},
        exception_handlers={InvalidRequest: _invalid_request},
        lifespan=[lifespan],
        state=State({"worker": worker}),
        openapi_config=None,
    )


# -- process entry ----------------------------------------------------------------------------
async def _next_generation(config: WorkerConfig) -> int:
    redis = await connect(config.redis_url)
    try:
        return await NodeRegistry(redis).next_generation(config.node_id)
    finally:
        await redis.aclose()


async def _register(config: WorkerConfig, record: NodeRecord) -> None:
    """Fail fast: a node whose block size or model differs from the cluster's is refused here."""
    redis = await connect(config.redis_url)
    try:
        await NodeRegistry(redis).register(record, config.heartbeat_ttl_s)
    finally:
        await redis.aclose()


def run_worker(config: WorkerConfig) -> None:
    """Load the model, check the cluster, serve until SIGTERM/SIGINT (then drain and deregister)."""
    import torch
    import uvicorn

    from kvstore.registry import RegistryError
    from workers.transfer import make_transport
    from kvstore.valkey import RedisUnavailable
    from workers.engine import EngineConfig
    from workers.loader import ModelNotFound, load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if config.cpus:
        os.sched_setaffinity(0, config.cpus)
    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    transport: KVTransport | None = None
    try:
        generation = asyncio.run(_next_generation(config))  # also: Redis reachable?
        model = load_model(config.model)
        engine = Engine(
            model,
            EngineConfig(block_size=config.block_size, kv_cache_bytes=int(config.kv_cache_gb * (1 << 30)), max_num_seqs=config.max_num_seqs),
        )
        transport = make_transport(config.transfer, config.node_id, engine.pool.kv, generation=generation, timeout_s=config.transfer_timeout_s)
        app = create_app(config, engine, generation, transport)
        asyncio.run(_register(config, app.state.worker.record))
    except (RedisUnavailable, ModelNotFound, InvalidRequest, RegistryError, TransferError) as exc:
        if transport is not None:  # its native progress threads must stop before the interpreter exits
            transport.close()
        print(f"agentkv worker: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("worker %s (%s) serving on %s", config.node_id, config.role.value, config.address)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=config.drain_timeout_s + 2)
