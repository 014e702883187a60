"""The node registry: which workers are alive, what they are, and how loaded they are.

A node is live while its heartbeat key has not expired, so a crashed worker drops out of routing
within one TTL without anyone noticing the crash. Each start of a worker gets a new, larger
generation; the index keys block entries by generation, so a restarted node's old entries are
invisible at once (see kvstore/index.py).

Every operation is one Lua script from kvstore/lua/ so that checks and writes are atomic (two nodes
registering with different block sizes at the same moment cannot both win). kvstore/lua/keys.lua,
prepended to every script, is the one place the registry's and the index's key names are built.

Redis Cluster: every key of a namespace carries the hash tag `{namespace}`, so all of them live in one
slot and each script (which reads the node set and many nodes' entries) runs on one primary. Every
script call names one key of the namespace (KEYS[1]) so a cluster client sends it to that slot's
primary. The price: one namespace's index and registry scale to one primary's throughput
(docs/scale-out.md has the measurement); sessions, which are per-conversation, spread over slots.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import msgspec
import redis.asyncio as aredis
from redis.commands.core import AsyncScript

from kvstore.nodes import NodeLoad, NodeRecord

_encode = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(NodeRecord).decode
_decode_load = msgspec.msgpack.Decoder(NodeLoad).decode


class RegistryError(RuntimeError):
    """Base class of the registry's refusals."""


class IncompatibleNode(RegistryError):
    """A node would join with a block size or model that differs from the live nodes'."""


class StaleGeneration(RegistryError):
    """A node registers with an older generation than one already registered under its id."""


@cache
def _lua(name: str) -> str:
    return (Path(__file__).with_name("lua") / f"{name}.lua").read_text()


class Script:
    """One kvstore/lua script behind the key layout (keys.lua), called as `await script(args=[prefix, ...])`.
    The namespace's anchor key goes in as KEYS[1]: it routes the call to the namespace's slot on a
    cluster (the scripts build their key names from the prefix; all share the slot)."""

    def __init__(self, redis: aredis.Redis, name: str) -> None:
        self._script: AsyncScript = redis.register_script(_lua("keys") + _lua(name))

    async def __call__(self, args: list) -> object:
        return await self._script(keys=[args[0] + "nodes"], args=args)


def scripts(redis: aredis.Redis, *names: str) -> list[Script]:
    """Register kvstore/lua/{name}.lua on `redis`; call them with the key prefix as the first argument.
    The client must keep responses binary (msgpack values)."""
    if redis.get_encoder().decode_responses:
        raise ValueError("the Redis client must not use decode_responses=True (values are binary msgpack)")
    return [Script(redis, name) for name in names]


def key_prefix(namespace: str) -> str:
    """`{namespace}:`: the namespace is the hash tag of every registry and index key (one cluster slot)."""
    if not namespace or "{" in namespace or "}" in namespace:
        raise ValueError(f"a namespace is a non-empty name without braces, got {namespace!r}")
    return f"{{{namespace}}}:"


class NodeRegistry:
    """Register, heartbeat and list nodes on a client the caller owns. Every method is one round trip."""

    def __init__(self, redis: aredis.Redis, namespace: str = "akv") -> None:
        self.redis = redis
        self.prefix = key_prefix(namespace)
        self._next_generation, self._register, self._heartbeat, self._deregister, self._live_nodes, self._records = (
            scripts(redis, "next_generation", "register", "heartbeat", "deregister", "live_nodes", "records")
        )

    async def next_generation(self, node_id: str) -> int:
        """A generation for a node that is starting: larger than every earlier one for this id."""
        return int(await self._next_generation(args=[self.prefix, node_id]))

    async def register(self, record: NodeRecord, ttl_s: float, load: NodeLoad | None = None) -> None:
        """Make `record` live for `ttl_s` seconds (keep it live with `heartbeat`).

        Re-registering the same generation is allowed (what a worker does after a Redis restart or a
        missed heartbeat). Raises IncompatibleNode if a live node has another block size or model, and
        StaleGeneration if a newer incarnation of this node id has registered.
        """
        load = load or NodeLoad(total_blocks=record.capacity_blocks, free_blocks=record.capacity_blocks)
        reply = await self._register(
            args=[self.prefix, record.node_id, str(record.generation), str(record.block_size),
                  record.model_fingerprint, _encode(record), _encode(load), _ttl_ms(ttl_s)]
        )  # fmt: skip
        status = reply[0].decode()
        if status == "stale":
            raise StaleGeneration(
                f"node {record.node_id!r} registers generation {record.generation}, but generation "
                f"{reply[1].decode()} of the same node id registered later: another process runs with this "
                "node id; stop it or give this worker another --node-id"
            )
        if status == "incompatible":
            other, bs, fp = (x.decode() for x in reply[1:])
            raise IncompatibleNode(
                f"node {record.node_id!r} has block_size={record.block_size} and model "
                f"{record.model_fingerprint!r}, but live node {other!r} has block_size={bs} and model {fp!r}: "
                "all nodes must serve the same model with the same --block-size (stop the others or fix this one)"
            )

    async def heartbeat(self, node_id: str, generation: int, load: NodeLoad, ttl_s: float) -> bool:
        """Refresh liveness and load. False means the node is not registered under `generation` any
        more (heartbeat TTL expired, Redis restarted, or a newer incarnation took over): the worker
        should `register` again and `BlockIndex.resync` its blocks."""
        return bool(await self._heartbeat(args=[self.prefix, node_id, str(generation), _encode(load), _ttl_ms(ttl_s)]))

    async def deregister(self, node_id: str, generation: int) -> bool:
        """Take the node out of routing now (clean shutdown). A no-op if `generation` is not the live one."""
        return bool(await self._deregister(args=[self.prefix, node_id, str(generation)]))

    async def live_nodes(self) -> list[tuple[NodeRecord, NodeLoad]]:
        flat = await self._live_nodes(args=[self.prefix])
        return [(_decode_record(flat[i]), _decode_load(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def get(self, node_id: str) -> NodeRecord | None:
        """The record of a live node, or None if it is not live."""
        return (await self.get_many([node_id])).get(node_id)

    async def get_many(self, node_ids: list[str]) -> dict[str, NodeRecord]:
        """Records of those of `node_ids` that are live."""
        raws = await self._records(args=[self.prefix, *node_ids]) if node_ids else []
        return {node_id: _decode_record(raw) for node_id, raw in zip(node_ids, raws) if raw is not None}


def _ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return max(1, round(ttl_s * 1000))
