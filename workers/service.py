"""The worker's internal HTTP API: Litestar handlers over the engine interface (workers.backend).

Paths and messages are kvstore.wire's, shared with the gateway; every endpoint but health and
metrics needs the cluster token when one is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore.nodes import NodeRecord
from kvstore.wire import TOKEN_HEADER, ErrorBody, GenerateRequest, Paths, PrefillRequest, PrefillResult, TokenChunk
from workers.backend import InvalidRequest, Unavailable, WorkerEngine
from workers.metrics import WorkerMetrics
from workers.publisher import KVPublisher

_encode = msgspec.json.Encoder().encode


@dataclass
class Worker:
    """What the handlers share; built by the process entry and kept in app state, never a global."""

    engine: WorkerEngine
    publisher: KVPublisher
    metrics: WorkerMetrics
    token: str | None = None
    draining: bool = False

    def accepting(self) -> WorkerEngine:
        if self.draining:
            raise Unavailable("this worker is shutting down; retry on another node")
        return self.engine


def token_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Constant-time comparison: how long a refusal takes says nothing about the token."""
    expected = connection.app.state.worker.token
    if expected and not hmac.compare_digest(connection.headers.get(TOKEN_HEADER, "").encode(), expected.encode()):
        raise NotAuthorizedException("missing or wrong cluster token")


@get(Paths.HEALTH, sync_to_thread=False)
def health(worker: Worker) -> dict:
    engine = worker.engine
    return {
        "status": "draining" if worker.draining else "ok", "node_id": engine.record.node_id,
        "generation": engine.record.generation, "role": engine.record.role.value,
        "load": msgspec.to_builtins(engine.load()), "redis_connected": worker.publisher.connected,
        "gc_frozen_objects": gc.get_freeze_count(), **engine.stats(),
    }


@get(Paths.INFO, guards=[token_guard], sync_to_thread=False)
def info(worker: Worker) -> NodeRecord:
    return worker.engine.record


@post(Paths.GENERATE, guards=[token_guard], status_code=200)
async def generate(data: GenerateRequest, worker: Worker) -> Stream:
    chunks = await worker.accepting().generate(data)
    worker.metrics.prompt_tokens.inc(len(data.prompt_token_ids))
    return Stream(_ndjson(chunks, worker.metrics), media_type="application/x-ndjson")


async def _ndjson(chunks: AsyncGenerator[TokenChunk, None], metrics: WorkerMetrics) -> AsyncIterator[bytes]:
    """One JSON line per chunk; a client that goes away closes `chunks`, which aborts the request."""
    final = None
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                final = chunk if chunk.finished else None
                yield _encode(chunk) + b"\n"
    finally:
        metrics.finished(final)


@post(Paths.PREFILL, guards=[token_guard], status_code=200)
async def prefill(data: PrefillRequest, worker: Worker) -> PrefillResult:
    result = await worker.accepting().prefill(data)
    worker.metrics.requests.labels("prefill").inc()
    worker.metrics.prompt_tokens.inc(result.prompt_tokens)
    worker.metrics.cached_tokens.inc(result.cached_tokens)
    return result


@post(Paths.ABORT, guards=[token_guard], status_code=204)
async def abort(request_id: str, worker: Worker) -> None:
    await worker.engine.abort(request_id)


@post(Paths.UNPIN, guards=[token_guard], status_code=200)
async def unpin(session_id: str, worker: Worker) -> dict:
    return {"session_id": session_id, "released": await worker.engine.unpin(session_id)}


@get(Paths.METRICS, sync_to_thread=False)
def metrics(worker: Worker) -> Response:
    m, load = worker.metrics, worker.engine.load()
    m.running.set(load.running)
    m.waiting.set(load.waiting)
    m.free_blocks.set(load.free_blocks)
    m.redis_connected.set(1 if worker.publisher.connected else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


def _error(_: Request, exc: InvalidRequest | Unavailable) -> Response:
    if isinstance(exc, InvalidRequest):
        return Response(ErrorBody(message=str(exc), code=exc.code, param=exc.param), status_code=400)
    return Response(ErrorBody(message=str(exc), code="unavailable"), status_code=503)


def create_app(worker: Worker) -> Litestar:
    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await worker.engine.start()
        # Everything loaded so far (torch, transformers, the model, litestar: ~500 k objects) lives
        # as long as the process: leave it out of the collector's full passes, each of which took
        # ~250 ms here, a stall of every running decode (vLLM freezes its startup heap the same way).
        gc.collect()
        gc.freeze()
        publishing = asyncio.create_task(worker.publisher.run(), name="kv-publisher")
        try:
            yield
        finally:  # leave the index first, so no new turn is routed here while in-flight ones finish
            worker.draining = True
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
            await worker.publisher.deregister()
            await worker.engine.stop()

    return Litestar(
        route_handlers=[health, info, generate, prefill, abort, unpin, metrics],
        dependencies={"worker": Provide(lambda: worker, sync_to_thread=False)},
        exception_handlers={InvalidRequest: _error, Unavailable: _error},
        lifespan=[lifespan],
        state=State({"worker": worker}),
        openapi_config=None,
    )

