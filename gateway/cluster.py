"""The gateway's view of the cluster: live nodes (refreshed in the background) and the model they serve.

The router reads fresh loads from the index lookup itself; this snapshot is what is left when the
index is unreachable or empty (DEGRADED routing), and where the gateway learns the model: its
fingerprint and block size (hash seeds), its context length, and the tokenizer directory the nodes
loaded. A Redis restart empties the registry until the workers re-register (one heartbeat): the
snapshot is kept over that gap, so requests keep being routed instead of getting 503 no_workers.
So is a registry that empties all at once without a restart: several nodes' heartbeats lapsing in
the same refresh say more likely that Redis or the machine stalled for a TTL (seen once in the test
suite on this busy 2-core VM: both workers' keys expired, 503s for ~1 s) than that they all died;
they come back with their next heartbeat. A node that leaves alone (killed, stopped, the last one
included) leaves the snapshot at the next refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.chat_template import ChatRenderer
from gateway.errors import NoWorkers
from gateway.router import check_compatible
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.registry import NodeRegistry

log = logging.getLogger("agentkv.gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    fingerprint: str
    block_size: int
    max_model_len: int


class ClusterView:
    def __init__(self, registry: NodeRegistry, refresh_s: float = 1.0, model_name: str | None = None,
                 restart_hold_s: float = 5.0, vanish_hold_s: float = 3.0) -> None:  # fmt: skip
        self.registry = registry
        self.refresh_s = refresh_s
        self.model_name = model_name
        self.restart_hold_s = restart_hold_s  # longest wait for the workers to re-register after a Redis restart
        self.vanish_hold_s = vanish_hold_s  # ... after several nodes vanished at once (a worker's heartbeat TTL, 3 s)
        self._nodes: list[tuple[NodeRecord, NodeLoad]] = []
        self.reachable = False
        self._redis_run_id: str | None = None
        self._held_until = 0.0  # the snapshot is held over an emptied registry until then

    def nodes(self) -> list[tuple[NodeRecord, NodeLoad]]:
        return list(self._nodes)

    async def refresh(self) -> list[tuple[NodeRecord, NodeLoad]]:
        try:
            run_id = await self._run_id()
            live = await self.registry.live_nodes()
            self.reachable = True
        except (RedisError, RedisClusterException, OSError) as exc:
            if self.reachable:
                log.warning("registry unreachable (%s); keeping the last node snapshot", exc)
            self.reachable = False
            return self._nodes
        if run_id != self._redis_run_id and self._redis_run_id is not None and self._nodes:
            log.warning("Redis restarted: routing on the last node snapshot until the workers re-register")
            self._held_until = time.monotonic() + self.restart_hold_s
        self._redis_run_id = run_id
        if not live and len(self._nodes) > 1 and not self._held_until:
            log.warning("every node left the registry at once; routing on the last snapshot for %g s", self.vanish_hold_s)
            self._held_until = time.monotonic() + self.vanish_hold_s
        if live or time.monotonic() >= self._held_until:
            self._nodes, self._held_until = live, 0.0
        return self._nodes

    async def _run_id(self) -> str | None:
        """Redis's per-process id: a new one means a restart (an empty registry, not a dead cluster).
        On a Redis Cluster, that of the primary holding the namespace's slot: a failover shows as a
        restart (the promoted replica may lack the last writes; the workers resync). None where INFO
        is not allowed (an ACL): then a restart is not detected."""
        redis = self.registry.redis
        try:
            if isinstance(redis, RedisCluster):  # the primary serving the namespace's slot (a failover is a restart)
                info = await redis.info("server", target_nodes=redis.get_node_from_key(self.registry.prefix + "nodes"))
            else:
                info = await redis.info("server")
        except ResponseError:
            return None
        return str(info.get("run_id", "")) or None

    async def run(self) -> None:
        """Background refresh loop (cancelled at shutdown)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def model(self) -> ModelInfo:
        nodes = self._nodes or await self.refresh()
        if not nodes:
            raise NoWorkers("no worker is registered: start one with `agentkv worker` (or use `agentkv up`)")
        records = [rec for rec, _ in nodes]
        check_compatible(records)
        first = min(records, key=lambda r: r.node_id)
        lens = [r.max_model_len for r in records if r.max_model_len]
        return ModelInfo(
            name=self.model_name or first.model_name or Path(first.model_path).name or "default",
            path=first.model_path,
            fingerprint=first.model_fingerprint,
            block_size=first.block_size,
            max_model_len=min(lens) if lens else 0,
        )


def _longest_token_chars(tokenizer: Any) -> int:
    """Byte-level vocabularies show each byte as one character, so this bounds a token's text too."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(t) for t in tokens if t), default=1)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def purge_dead_index_entries(index: BlockIndex, every_s: float) -> None:
    """Background loop: drop the index entries of expired and restarted nodes (lookups already
    ignore them; this bounds Redis memory). Idempotent, so several gateways may run it."""
    while True:
        await asyncio.sleep(every_s)
        try:
            for node_id, generation in await index.purge_dead():
                log.info("dropped the index entries of node %s generation %s", node_id, generation)
        except (RedisError, OSError) as exc:
            log.debug("index purge skipped: %s", exc)


class Renderers:
    """One ChatRenderer per model fingerprint, the tokenizer loaded off the event loop once.

    Rendering and tokenizing a long prompt takes seconds of CPU: `offload` runs them on one thread
    of their own (a tokenizer is not safe to share between threads), never on the event loop.
    """

    def __init__(self, loader: Callable[[str], Any] = load_tokenizer, tokenizer_path: str | None = None) -> None:
        self.loader = loader
        self.tokenizer_path = tokenizer_path  # override: the gateway cannot read the nodes' model_path
        self._by_fingerprint: dict[str, ChatRenderer] = {}
        self._longest: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentkv-tokenize")

    async def get(self, model: ModelInfo) -> ChatRenderer:
        async with self._lock:
            if model.fingerprint not in self._by_fingerprint:
                path = self.tokenizer_path or model.path or model.name
                try:
                    tokenizer = await asyncio.to_thread(self.loader, path)
                    longest = await asyncio.to_thread(_longest_token_chars, tokenizer)
                except Exception as exc:
                    raise NoWorkers(f"cannot load the tokenizer of model {model.name!r} from {path!r}: {exc} "
                                    "(give the gateway --tokenizer PATH)") from None  # fmt: skip
                self._by_fingerprint[model.fingerprint] = ChatRenderer(tokenizer)
                self._longest[model.fingerprint] = longest
            return self._by_fingerprint[model.fingerprint]

    async def longest_token_chars(self, model: ModelInfo) -> int:
        """Characters of the vocabulary's longest token: no token covers more of a text."""
        await self.get(model)
        return self._longest[model.fingerprint]

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenizer thread (CPU-heavy rendering and tokenizing)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return bool(self._by_fingerprint)
