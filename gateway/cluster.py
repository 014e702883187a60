"""The gateway's view of the cluster: live nodes (refreshed in the background) and the model they serve.

The router reads fresh loads from the index lookup itself; this snapshot is what is left when the
index is unreachable (DEGRADED routing), and where the gateway learns the model: its fingerprint
and block size (hash seeds), its context length, and the tokenizer directory the nodes loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gateway.chat_template import ChatRenderer
from gateway.errors import NoWorkers
from gateway.router import check_compatible
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.registry import NodeRegistry

log = logging.getLogger("agentkv.gateway")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    fingerprint: str
    block_size: int
    max_model_len: int


class ClusterView:
    def __init__(self, registry: NodeRegistry, refresh_s: float = 1.0, model_name: str | None = None) -> None:
        self.registry = registry
        self.refresh_s = refresh_s
        self.model_name = model_name
        self._nodes: list[tuple[NodeRecord, NodeLoad]] = []
        self.reachable = False

    def nodes(self) -> list[tuple[NodeRecord, NodeLoad]]:
        return list(self._nodes)

    async def refresh(self) -> list[tuple[NodeRecord, NodeLoad]]:
        try:
            self._nodes = await self.registry.live_nodes()
            self.reachable = True
        except (RedisError, OSError) as exc:
            if self.reachable:
                log.warning("registry unreachable (%s); keeping the last node snapshot", exc)
            self.reachable = False
        return self._nodes

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
    """One ChatRenderer per model fingerprint, the tokenizer loaded off the event loop once."""

    def __init__(self, loader: Callable[[str], Any] = load_tokenizer, tokenizer_path: str | None = None) -> None:
        self.loader = loader
        self.tokenizer_path = tokenizer_path  # override: the gateway cannot read the nodes' model_path
        self._by_fingerprint: dict[str, ChatRenderer] = {}
        self._lock = asyncio.Lock()

    async def get(self, model: ModelInfo) -> ChatRenderer:
        async with self._lock:
            if model.fingerprint not in self._by_fingerprint:
                path = self.tokenizer_path or model.path or model.name
                try:
                    tokenizer = await asyncio.to_thread(self.loader, path)
                except Exception as exc:
                    raise NoWorkers(f"cannot load the tokenizer of model {model.name!r} from {path!r}: {exc} "
                                    "(give the gateway --tokenizer PATH)") from None  # fmt: skip
                self._by_fingerprint[model.fingerprint] = ChatRenderer(tokenizer)
            return self._by_fingerprint[model.fingerprint]

    @property
    def ready(self) -> bool:
        return bool(self._by_fingerprint)
