"""The block index: which live node holds the longest prefix of a request's block hashes.

Layout: one Redis SET per node incarnation, `akv:blk:{node_id}:{generation}`, whose members are the
node's block hashes as 8 little-endian bytes, plus `akv:blksets`, the SET of `{node_id}:{generation}`
that have entries (so cleanup never needs SCAN). Liveness and the live generation come from the
registry's `akv:node:{id}` hash (kvstore/registry.py).

Why per-node sets rather than one key per block hash (llm-d's layout: block hash -> hash of pods)?
- Memory: one member per (node, block) and no key per block: 54 B against 69-88 B per block (docs/index.md).
- Generations for free: a restarted node writes a new key, so its old entries are invisible the moment
  it registers, stale events cannot touch the live set, and purging an incarnation is one UNLINK.
- `cleared` is one UNLINK too, and the index shrinks exactly as pools evict (an empty SET vanishes).
The lookup checks each live node's set with SMISMEMBER in chunks that grow 16, 64, 256, ... and stops
at the node's first miss, so a node that shares nothing costs one small call.

Why EVALSHA scripts rather than FUNCTION LOAD: a script is addressed by the hash of its text, so two
gateway versions with different scripts share one Redis without clashing over a library name, and
redis-py reloads a script transparently after a Redis restart (NOSCRIPT), where functions would need
an explicit reload step; it also works on servers and ACL users without FUNCTION rights. Either way
the scripts touch keys they compute from node ids, so the index needs a single primary (not Cluster).

Round trips: `apply`, `lookup`, `purge_node`, `sizes`: one each; `purge_dead`: two. `lookup_with_nodes`:
one, plus one to fetch records the first time a node incarnation is seen (records are immutable per
generation and cached). `resync`: two (upload into a temporary key, then swap it in atomically).
"""

from __future__ import annotations

import secrets
import struct

import msgspec
import redis.asyncio as aredis

from kvstore.events import AllCleared, BlockRemoved, BlockStored, KVEventBatch
from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.registry import NodeRegistry, require_binary_responses

_decode_load = msgspec.msgpack.Decoder(NodeLoad).decode
_NO_LOAD = msgspec.msgpack.encode(NodeLoad())

# Lua helpers. Hashes arrive packed (8 bytes each) in one argument: cheaper for the client to encode
# than one argument per hash, and struct.unpack splits them in C, about twice as fast as string.sub.
# Lua's stack holds a few thousand values, so both work in chunks of at most 1024 hashes.
_LUA_HASHES = """
local function split(packed, first, last)
  local t = {struct.unpack(string.rep('c8', last - first + 1), packed, 8 * first - 7)}
  t[#t] = nil  -- struct.unpack also returns the next position
  return t
end
local function all_hashes(packed)
  local n = #packed / 8
  if n <= 1024 then return n == 0 and {} or split(packed, 1, n) end
  local hashes = {}
  for i = 1, n, 1024 do
    for _, h in ipairs(split(packed, i, math.min(n, i + 1023))) do hashes[#hashes + 1] = h end
  end
  return hashes
end
local function each_chunk(packed, cmd, key)
  local n = #packed / 8
  for i = 1, n, 1024 do redis.call(cmd, key, unpack(split(packed, i, math.min(n, i + 1023)))) end
  return n
end
"""

_APPLY = (
    _LUA_HASHES
    + """
-- ARGV: prefix, id, gen, then (op, packed hashes) pairs; op is s(tored), r(emoved) or c(leared).
-- Events of any generation but the node's newest are dropped: a zombie cannot write.
local p, id, gen = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', p .. 'gen:' .. id) ~= gen then return -1 end
local key = p .. 'blk:' .. id .. ':' .. gen
local applied = 0
for a = 4, #ARGV, 2 do
  local op = ARGV[a]
  if op == 'c' then
    redis.call('UNLINK', key)
  else
    applied = applied + each_chunk(ARGV[a + 1], op == 's' and 'SADD' or 'SREM', key)
  end
end
if redis.call('EXISTS', key) == 1 then
  redis.call('SADD', p .. 'blksets', id .. ':' .. gen)
else
  redis.call('SREM', p .. 'blksets', id .. ':' .. gen)
end
return applied
"""
)

_LOOKUP = (
    _LUA_HASHES
    + """
-- ARGV: prefix, packed hashes. Returns id, gen, matched, load for every live node.
local p = ARGV[1]
local hashes = all_hashes(ARGV[2])
local n = #hashes
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local node = redis.call('HMGET', p .. 'node:' .. id, 'gen', 'load')
  local gen = node[1]
  if gen then
    local key = p .. 'blk:' .. id .. ':' .. gen
    local matched, step = 0, 16
    while matched < n do
      local upto = math.min(n, matched + step)
      local hits = redis.call('SMISMEMBER', key, unpack(hashes, matched + 1, upto))
      local k = 1
      while hits[k] == 1 do k = k + 1 end
      matched = matched + k - 1
      if matched < upto then break end
      step = math.min(step * 4, 4096)
    end
    out[#out + 1] = id
    out[#out + 1] = gen
    out[#out + 1] = matched
    out[#out + 1] = node[2] or ''
  end
end
return out
"""
)

_RESYNC_COMMIT = """
-- ARGV: prefix, id, gen, temporary key. Swaps the uploaded set in if gen is still the node's newest.
local p, id, gen, tmp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', p .. 'gen:' .. id) ~= gen then
  redis.call('UNLINK', tmp)
  return 0
end
local key = p .. 'blk:' .. id .. ':' .. gen
if redis.call('EXISTS', tmp) == 1 then
  redis.call('RENAME', tmp, key)
  redis.call('PERSIST', key)
  redis.call('SADD', p .. 'blksets', id .. ':' .. gen)
else
  redis.call('UNLINK', key)
  redis.call('SREM', p .. 'blksets', id .. ':' .. gen)
end
return 1
"""

_PURGE_DEAD = """
-- ARGV: prefix. Unlinks every entry set whose generation is not its node's live one.
local p = ARGV[1]
local purged = {}
for _, m in ipairs(redis.call('SMEMBERS', p .. 'blksets')) do
  local id, gen = string.match(m, '^(.*):(%d+)$')
  if redis.call('HGET', p .. 'node:' .. id, 'gen') ~= gen then
    redis.call('UNLINK', p .. 'blk:' .. m)
    redis.call('SREM', p .. 'blksets', m)
    purged[#purged + 1] = m
  end
end
return purged
"""

_PURGE_NODE = """
-- ARGV: prefix, id, gen
redis.call('SREM', ARGV[1] .. 'blksets', ARGV[2] .. ':' .. ARGV[3])
return redis.call('UNLINK', ARGV[1] .. 'blk:' .. ARGV[2] .. ':' .. ARGV[3])
"""

_SIZES = """
-- ARGV: prefix. Returns id, number of indexed blocks for every live node.
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local gen = redis.call('HGET', p .. 'node:' .. id, 'gen')
  if gen then
    out[#out + 1] = id
    out[#out + 1] = redis.call('SCARD', p .. 'blk:' .. id .. ':' .. gen)
  end
end
return out
"""

_RESYNC_CHUNK = 8192


class BlockIndex:
    """Apply nodes' KV events and answer longest-prefix lookups across live nodes."""

    def __init__(self, redis: aredis.Redis, namespace: str = "akv", registry: NodeRegistry | None = None) -> None:
        require_binary_responses(redis)
        self.redis = redis
        self.prefix = f"{namespace}:"
        self.registry = registry or NodeRegistry(redis, namespace)
        self._apply = redis.register_script(_APPLY)
        self._lookup = redis.register_script(_LOOKUP)
        self._resync_commit = redis.register_script(_RESYNC_COMMIT)
        self._purge_dead = redis.register_script(_PURGE_DEAD)
        self._purge_node = redis.register_script(_PURGE_NODE)
        self._sizes = redis.register_script(_SIZES)
        self._records: dict[str, NodeRecord] = {}  # node_id -> record of the generation last seen

    async def apply(self, batch: KVEventBatch) -> bool:
        """Apply the batch's events in order, atomically, in one round trip.

        Returns False, changing nothing, when `batch.generation` is not the node's newest registered
        generation: a stale incarnation, or a node unknown to Redis (e.g. after a Redis restart, in
        which case the worker should `register` again and `resync`).
        """
        args: list[bytes | str] = [self.prefix, batch.node_id, str(batch.generation)]
        for event in batch.events:
            if isinstance(event, BlockStored):
                if event.block_hashes:
                    args += ("s", _pack(event.block_hashes))
            elif isinstance(event, BlockRemoved):
                if event.block_hashes:
                    args += ("r", _pack(event.block_hashes))
            elif isinstance(event, AllCleared):
                args += ("c", b"")
            else:
                raise TypeError(f"not a KV event: {event!r}")
        return int(await self._apply(args=args)) >= 0

    async def lookup(self, block_hashes: list[int]) -> dict[str, int]:
        """For every live node, how many leading blocks of `block_hashes` it holds. One round trip."""
        return {node_id: matched for node_id, _, matched, _ in await self._matches(block_hashes)}

    async def lookup_with_nodes(self, block_hashes: list[int]) -> list[tuple[NodeRecord, NodeLoad, int]]:
        """`lookup` plus each live node's record and current load, longest match first.

        One round trip, plus one the first time a node incarnation is seen (to fetch its record).
        """
        matches = await self._matches(block_hashes)
        missing = [
            node_id
            for node_id, gen, _, _ in matches
            if (rec := self._records.get(node_id)) is None or rec.generation != gen
        ]
        if missing:
            self._records.update(await self.registry.get_many(missing))
        result = []
        for node_id, gen, matched, load in matches:
            record = self._records.get(node_id)
            if record is not None and record.generation == gen:  # else it restarted between the two calls
                result.append((record, load, matched))
        result.sort(key=lambda r: (-r[2], r[0].node_id))
        return result

    async def resync(self, node_id: str, generation: int, all_hashes: list[int]) -> bool:
        """Replace the node's whole entry set with `all_hashes` atomically (after a Redis restart or a
        lapsed heartbeat, the worker re-registers and republishes its pool). Two round trips.

        Returns False, changing nothing, if `generation` is not the node's newest registered one.
        Call it from the task that publishes the node's events: a batch applied during the upload
        would be overwritten by the swap.
        """
        tmp = f"{self.prefix}tmp:{node_id}:{generation}:{secrets.token_hex(4)}"
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(all_hashes), _RESYNC_CHUNK):
            chunk = all_hashes[start : start + _RESYNC_CHUNK]
            packed = _pack(chunk)
            pipe.sadd(tmp, *(packed[i : i + 8] for i in range(0, len(packed), 8)))
        pipe.pexpire(tmp, 120_000)  # an abandoned upload cleans itself up
        await pipe.execute()
        return bool(await self._resync_commit(args=[self.prefix, node_id, str(generation), tmp]))

    async def purge_node(self, node_id: str, generation: int) -> bool:
        """Drop every entry of one node incarnation now (e.g. on clean shutdown). True if there were any."""
        return bool(await self._purge_node(args=[self.prefix, node_id, str(generation)]))

    async def purge_dead(self) -> list[tuple[str, int]]:
        """Background cleanup: drop the entries of expired nodes and of superseded generations, and
        forget expired node ids. Returns the purged (node_id, generation) pairs. Lookups never need
        this for correctness (they read only live generations); it bounds memory."""
        purged = []
        for member in await self._purge_dead(args=[self.prefix]):
            node_id, _, gen = member.decode().rpartition(":")
            purged.append((node_id, int(gen)))
        await self.registry.prune_expired()
        return purged

    async def sizes(self) -> dict[str, int]:
        """Indexed blocks per live node (should equal the node's cached full blocks)."""
        flat = await self._sizes(args=[self.prefix])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def _matches(self, block_hashes: list[int]) -> list[tuple[str, int, int, NodeLoad]]:
        flat = await self._lookup(args=[self.prefix, _pack(block_hashes)])
        return [
            (flat[i].decode(), int(flat[i + 1]), int(flat[i + 2]), _decode_load(flat[i + 3] or _NO_LOAD))
            for i in range(0, len(flat), 4)
        ]


def _pack(block_hashes: list[int]) -> bytes:
    try:
        return struct.pack(f"<{len(block_hashes)}Q", *block_hashes)
    except struct.error:
        bad = next((h for h in block_hashes if not (isinstance(h, int) and 0 <= h < 1 << 64)), None)
        raise ValueError(f"block hashes must be unsigned 64-bit ints, got {bad!r}") from None
