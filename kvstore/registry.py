"""The node registry: which workers are alive, what they are, and how loaded they are.

A node is live while its heartbeat key has not expired, so a crashed worker drops out of routing
within one TTL without anyone noticing the crash. Each start of a worker gets a new, larger
generation; the index keys block entries by generation, so a restarted node's old entries are
invisible at once (see kvstore/index.py).

Redis layout (prefix `akv:` by default; values are msgpack-encoded msgspec structs):

    akv:nodes          SET   node ids ever registered (expired ones are pruned by `prune_expired`)
    akv:node:{id}      HASH  gen, bs (block size), fp (model fingerprint), rec (NodeRecord), load (NodeLoad);
                             expires `ttl_s` after the last heartbeat: its existence *is* liveness
    akv:gen:{id}       STR   the newest generation issued/registered for the node (no expiry)

Every mutation is one Lua script so that checks and writes are atomic (two nodes registering with
different block sizes at the same moment cannot both win). Generations travel as decimal strings and
are compared as such in Lua, whose numbers are doubles and would round large integers.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aredis

from kvstore.nodes import NodeLoad, NodeRecord

_encode = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(NodeRecord).decode
_decode_load = msgspec.msgpack.Decoder(NodeLoad).decode

# Lua: is decimal string a greater than decimal string b (both non-negative, no leading zeros)?
LUA_GT = """
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
"""


class RegistryError(RuntimeError):
    """Base class of the registry's refusals."""


class IncompatibleNode(RegistryError):
    """A node would join with a block size or model that differs from the live nodes'."""


class StaleGeneration(RegistryError):
    """A node registers with an older generation than one already registered under its id."""


def require_binary_responses(client: aredis.Redis) -> None:
    """The registry and index store binary values; a client that decodes responses would corrupt them."""
    if client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("the Redis client must not use decode_responses=True (values are binary msgpack)")


_NEXT_GENERATION = """
-- ARGV: counter key. Seeded from the server clock in microseconds (exact in a Lua double) the first
-- time, so that a Redis restart never hands out a generation an earlier incarnation already used.
local key = ARGV[1]
if redis.call('EXISTS', key) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', key, string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
end
return redis.call('INCR', key)
"""

_REGISTER = (
    LUA_GT
    + """
-- ARGV: prefix, id, gen, block_size, fingerprint, record, load, ttl_ms
local p, id, gen, bs, fp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local newest = redis.call('GET', p .. 'gen:' .. id)
if newest and gt(newest, gen) then return {'stale', newest} end
for _, other in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  if other ~= id then
    local v = redis.call('HMGET', p .. 'node:' .. other, 'bs', 'fp')
    if v[1] and (v[1] ~= bs or v[2] ~= fp) then return {'incompatible', other, v[1], v[2]} end
  end
end
local key = p .. 'node:' .. id
redis.call('DEL', key)
redis.call('HSET', key, 'gen', gen, 'bs', bs, 'fp', fp, 'rec', ARGV[6], 'load', ARGV[7])
redis.call('PEXPIRE', key, ARGV[8])
redis.call('SADD', p .. 'nodes', id)
redis.call('SET', p .. 'gen:' .. id, gen)
return {'ok'}
"""
)

_HEARTBEAT = """
-- ARGV: prefix, id, gen, load, ttl_ms
local key = ARGV[1] .. 'node:' .. ARGV[2]
if redis.call('HGET', key, 'gen') ~= ARGV[3] then return 0 end
redis.call('HSET', key, 'load', ARGV[4])
redis.call('PEXPIRE', key, ARGV[5])
return 1
"""

_DEREGISTER = """
-- ARGV: prefix, id, gen
local key = ARGV[1] .. 'node:' .. ARGV[2]
if redis.call('HGET', key, 'gen') ~= ARGV[3] then return 0 end
redis.call('DEL', key)
redis.call('SREM', ARGV[1] .. 'nodes', ARGV[2])
return 1
"""

_LIVE_NODES = """
-- ARGV: prefix. Returns rec, load, rec, load, ... of every live node.
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'nodes')) do
  local v = redis.call('HMGET', ARGV[1] .. 'node:' .. id, 'rec', 'load')
  if v[1] then out[#out + 1] = v[1]; out[#out + 1] = v[2] end
end
return out
"""

_PRUNE_EXPIRED = """
-- ARGV: prefix. Forgets node ids whose heartbeat expired; returns them.
local gone = {}
for _, id in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'nodes')) do
  if redis.call('EXISTS', ARGV[1] .. 'node:' .. id) == 0 then
    redis.call('SREM', ARGV[1] .. 'nodes', id)
    gone[#gone + 1] = id
  end
end
return gone
"""


class NodeRegistry:
    """Register, heartbeat and list nodes. Every method is one round trip to Redis."""

    def __init__(self, redis: aredis.Redis, namespace: str = "akv") -> None:
        require_binary_responses(redis)
        self.redis = redis
        self.prefix = f"{namespace}:"
        self._next_generation = redis.register_script(_NEXT_GENERATION)
        self._register = redis.register_script(_REGISTER)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._deregister = redis.register_script(_DEREGISTER)
        self._live_nodes = redis.register_script(_LIVE_NODES)
        self._prune_expired = redis.register_script(_PRUNE_EXPIRED)

    async def next_generation(self, node_id: str) -> int:
        """A generation for a node that is starting: larger than every earlier one for this id."""
        return int(await self._next_generation(args=[f"{self.prefix}gen:{node_id}"]))

    async def register(self, record: NodeRecord, ttl_s: float, load: NodeLoad | None = None) -> None:
        """Make `record` live for `ttl_s` seconds (keep it live with `heartbeat`).

        Re-registering the same generation is allowed (what a worker does after a Redis restart or a
        missed heartbeat). Raises IncompatibleNode if a live node has another block size or model, and
        StaleGeneration if a newer incarnation of this node id has registered.
        """
        reply = await self._register(
            args=[
                self.prefix,
                record.node_id,
                str(record.generation),
                str(record.block_size),
                record.model_fingerprint,
                _encode(record),
                _encode(load or NodeLoad(total_blocks=record.capacity_blocks, free_blocks=record.capacity_blocks)),
                _ttl_ms(ttl_s),
            ]
        )
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
        raw = await self.redis.hget(f"{self.prefix}node:{node_id}", "rec")
        return None if raw is None else _decode_record(raw)

    async def get_many(self, node_ids: list[str]) -> dict[str, NodeRecord]:
        """Records of those of `node_ids` that are live, in one round trip."""
        if not node_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.hget(f"{self.prefix}node:{node_id}", "rec")
        raws = await pipe.execute()
        return {node_id: _decode_record(raw) for node_id, raw in zip(node_ids, raws) if raw is not None}

    async def prune_expired(self) -> list[str]:
        """Forget node ids whose heartbeat expired, so lookups stop visiting them; returns those ids."""
        return [x.decode() for x in await self._prune_expired(args=[self.prefix])]


def _ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return max(1, round(ttl_s * 1000))
