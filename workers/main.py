"""The worker process: start its engine (built-in, or a vLLM server), join the cluster, serve the
internal API until SIGTERM.

One Redis connection serves the whole process: the generation counter, the registration, the
registry lookups of disaggregation and the KV publisher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

import uvicorn

from kvstore.index import BlockIndex
from kvstore.registry import NodeRegistry, RegistryError
from kvstore.valkey import RedisUnavailable, connect
from workers.backend import InvalidRequest, WorkerEngine
from workers.config import WorkerConfig
from workers.loader import ModelNotFound
from workers.metrics import WorkerMetrics
from workers.publisher import KVPublisher
from workers.service import Worker, create_app
from workers.transfer import TransferError
from workers.vllm_server import VllmError

log = logging.getLogger("agentkv.worker")


class InsecureRefused(RuntimeError):
    """No cluster token and no explicit --insecure."""


def check_token(config: WorkerConfig) -> None:
    """A worker without a cluster token serves its internal API (generate, prefill, unpin) to anyone who
    reaches its port: only when asked for explicitly, and then loudly."""
    if config.cluster_token:
        return
    if not config.insecure:
        raise InsecureRefused("no cluster token: set AGENTKV_CLUSTER_TOKEN (or --cluster-token) to the gateway's, "
                              "or pass --insecure to serve the internal API to anyone who can reach the port")
    log.warning("INSECURE: no cluster token; anyone who reaches %s can use this worker's internal API", config.address)


def run_worker(config: WorkerConfig) -> None:
    """Serve until SIGTERM/SIGINT (then deregister and drain); a refused start is one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_token(config)
    except InsecureRefused as exc:
        print(f"agentkv worker: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if config.cpus:
        os.sched_setaffinity(0, config.cpus)
    try:
        asyncio.run(_serve(config))
    except (RedisUnavailable, ModelNotFound, InvalidRequest, RegistryError, TransferError, VllmError) as exc:
        print(f"agentkv worker: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve(config: WorkerConfig) -> None:
    redis = await connect(config.redis_url)  # fails fast when Redis is unreachable
    try:
        registry = NodeRegistry(redis, config.namespace)
        generation = await registry.next_generation(config.node_id)
        metrics = WorkerMetrics()
        engine, close = await _engine(config, generation, registry, metrics)
        try:
            await registry.register(engine.record, config.heartbeat_ttl_s)  # refuses a block size or model the cluster lacks
        except BaseException:
            close()  # native progress threads (NIXL) or the vLLM server must stop before we exit
            raise
        publisher = KVPublisher(engine, registry, BlockIndex(redis, registry=registry), ttl_s=config.heartbeat_ttl_s)
        app = create_app(Worker(engine, publisher, metrics, config.cluster_token))
        log.info("worker %s (%s, %s engine) serving on %s", config.node_id, config.role.value, config.engine, config.address)
        server_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                       timeout_graceful_shutdown=config.drain_timeout_s + 2)  # fmt: skip
        await uvicorn.Server(server_config).serve()
    finally:
        await redis.aclose()


async def _engine(config: WorkerConfig, generation: int, registry: NodeRegistry,
                  metrics: WorkerMetrics) -> tuple[WorkerEngine, Callable[[], None]]:  # fmt: skip
    """The configured engine, and what stops its resources if the node cannot join."""
    if config.engine == "vllm":
        from workers.vllm_engine import VllmEngine

        vllm = await VllmEngine.launch(config, generation)
        return vllm, vllm.server.stop
    import torch

    from workers.builtin import BuiltinEngine
    from workers.engine import Engine, EngineConfig
    from workers.loader import load_model
    from workers.transfer import bind_transport_to, make_transport, net_devices_for

    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    kv_bytes = int(config.kv_cache_gb * (1 << 30))
    engine = Engine(load_model(config.model), EngineConfig(config.block_size, kv_cache_bytes=kv_bytes,
                                                           max_num_seqs=config.max_num_seqs,
                                                           mixed_prefill_tokens=config.mixed_prefill_tokens,
                                                           itl_slowdown=config.itl_slowdown,
                                                           short_prompt_tokens=config.short_prompt_tokens))  # fmt: skip
    bind_transport_to(config.transfer_devices or net_devices_for(config.advertise_host or config.host),
                      explicit=bool(config.transfer_devices))
    transport = make_transport(config.transfer, config.node_id, engine.pool.kv, generation=generation,
                               timeout_s=config.transfer_timeout_s)  # fmt: skip
    try:
        return BuiltinEngine(config, engine, generation, transport, registry, metrics), transport.close
    except BaseException:
        transport.close()
        raise
