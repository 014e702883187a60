"""`create_app()`: routes, dependencies, exception handlers and the lifespan in one readable place.

Shared clients (Redis, the httpx pool to the workers) and the services built on them are created
in the lifespan and handed to handlers through dependency injection; nothing lives in module
globals, so two apps (two tenants' configs, two tests) never share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aredis
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.api import OpenAIController, SessionController, health, metrics
from gateway.cluster import ClusterView, Renderers, purge_dead_index_entries
from gateway.config import GatewayConfig
from gateway.errors import EXCEPTION_HANDLERS, APIError
from gateway.metrics import GatewayMetrics
from gateway.reply import InFlight
from gateway.responses import ResponsesController
from gateway.router import Router
from gateway.sessions import SessionStore
from gateway.tenants import TenantDirectory
from gateway.turn import TurnPipeline
from gateway.worker_client import ABORT_TIMEOUT_S, WorkerClient
from kvstore.index import BlockIndex
from kvstore.registry import NodeRegistry
from kvstore.valkey import connect

log = logging.getLogger("agentkv.gateway")


@dataclass
class Services:
    cluster: ClusterView
    renderers: Renderers
    sessions: SessionStore
    turns: TurnPipeline


def create_app(
    config: GatewayConfig,
    *,
    redis: aredis.Redis | None = None,
    http: httpx.AsyncClient | None = None,
    renderers: Renderers | None = None,
) -> Litestar:
    """The gateway app. `redis`, `http` and `renderers` may be supplied (tests); otherwise the
    lifespan creates them from `config` and closes them at shutdown."""
    gateway_metrics = GatewayMetrics()
    tenants = TenantDirectory(config.api_keys)
    inflight = InFlight()  # gateway.server stops it on SIGINT/SIGTERM, before uvicorn waits for open requests

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        inflight.bind(asyncio.get_running_loop())
        async with contextlib.AsyncExitStack() as stack:
            r = redis
            if r is None:
                r = await connect(config.redis_url)
                stack.push_async_callback(r.aclose)
            client = http
            if client is None:
                client = httpx.AsyncClient(timeout=httpx.Timeout(config.worker_read_timeout_s, connect=config.worker_connect_timeout_s),
                                           limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64))  # fmt: skip
                stack.push_async_callback(client.aclose)
            registry = NodeRegistry(r, config.namespace)
            cluster = ClusterView(registry, config.node_refresh_s, config.model_name)
            index = BlockIndex(r, config.namespace, registry)
            router = Router(index, cluster.nodes, config.router)
            workers = WorkerClient(client, gateway_metrics, config.cluster_token, config.prefill_hold_timeout_s)

            async def unpin(node_ids: list[str], key: str) -> list[str]:
                live = {rec.node_id: rec for rec, _ in cluster.nodes() or await cluster.refresh()}
                pinning = [live[n] for n in node_ids if n in live and "session_pins" in live[n].features]  # vLLM: none
                return [rec.node_id for rec in pinning if await workers.unpin(rec, key)]

            sessions = SessionStore(r, config.namespace, config.session_ttl_s, config.max_session_ttl_s, unpin)
            rend = renderers or Renderers(tokenizer_path=config.tokenizer)
            stack.callback(rend.close)
            turns = TurnPipeline(config, cluster, rend, router, workers, sessions, gateway_metrics)
            app.state.services = Services(cluster, rend, sessions, turns)
            await cluster.refresh()
            gc.collect()  # the startup heap (litestar, transformers, the tokenizer's Python side) stays for
            gc.freeze()  # the process's life: keep it out of the collector's full passes (workers/service.py)
            for task in (asyncio.create_task(cluster.run(), name="agentkv-cluster-refresh"),
                         asyncio.create_task(purge_dead_index_entries(index, config.index_purge_s), name="agentkv-index-purge"),
                         asyncio.create_task(_warm_tokenizer(cluster, rend), name="agentkv-tokenizer")):  # fmt: skip
                stack.callback(task.cancel)
            yield
            inflight.stop()  # turns still running end cleanly and abort on their workers
            if not await inflight.drained(ABORT_TIMEOUT_S + 1):  # ... before the worker client closes
                log.warning("%d turn(s) still running at shutdown", inflight.count)

    def service(name: str) -> Provide:
        def provider(state: State) -> Any:
            return getattr(state.services, name)

        return Provide(provider, sync_to_thread=False)

    return Litestar(
        route_handlers=[OpenAIController, SessionController, ResponsesController, health, metrics],
        dependencies={
            "tenants": Provide(lambda: tenants, sync_to_thread=False),
            "metrics": Provide(lambda: gateway_metrics, sync_to_thread=False),
            "cluster": service("cluster"),
            "renderers": service("renderers"),
            "sessions": service("sessions"),
            "turns": service("turns"),
            "inflight": Provide(lambda: inflight, sync_to_thread=False),
            "gateway_config": Provide(lambda: config, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=[lifespan],
        middleware=[_count_requests(gateway_metrics)],
        openapi_config=OpenAPIConfig(title="agentkv gateway", version="0.1.0", path="/schema"),
        request_max_body_size=config.max_body_bytes,  # 413 before the body is read (prompts are bounded again by the context)
        state=State({"inflight": inflight}),
    )


async def _warm_tokenizer(cluster: ClusterView, renderers: Renderers) -> None:
    """Load the tokenizer as soon as a node tells us the model, not on the first request (seconds)."""
    while True:
        try:
            await renderers.get(await cluster.model())
            return
        except APIError:
            await asyncio.sleep(cluster.refresh_s)


def _count_requests(m: GatewayMetrics) -> Callable[[ASGIApp], ASGIApp]:
    """Requests by route template and status (templates, not paths: bounded label values)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500

            async def capture(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, capture)
            finally:
                m.requests.labels(scope.get("path_template") or "other", str(status)).inc()

        return wrapped

    return middleware
