"""The block index: which live node holds the longest prefix of a request's block hashes.

Layout, per node incarnation (`{id}:{gen}`), block hashes as 8 little-endian bytes:

- `akv:blk:{id}:{gen}` HASH: block hash -> parent hash (empty for a prompt's first block) plus one
  state byte, `F` when the node holds the block's whole prefix ("full") and `h` when some ancestor
  is missing (held, but unreachable by prefix matching);
- `akv:kid:{id}:{gen}` HASH: parent hash -> the node's blocks that name it as parent, concatenated
  (so a store or eviction in the middle of a chain can update its descendants' state);
- `akv:blksets` SET of `{id}:{gen}` that have entries (so cleanup never needs SCAN).

Liveness and the live generation come from the registry's `akv:node:{id}` hash (kvstore/registry.py).

Why the `F` state: "node holds blocks 1..i of this prompt" is exactly "block i is full on the node",
and fullness is monotone along a prompt (a full block's parent is full). So a lookup finds each node's
longest prefix by binary search, about log2(n) probes, instead of checking every block: 512 blocks x 8
nodes cost ~1,600 membership checks before, ~40 probes now. Writes pay for it: a store or removal that
changes a block's state walks its held descendants (none in the usual tail-first eviction order).
The state is exact for any event order; it trusts that events name the true parent, which the chained
block hashes guarantee (a block hash determines its whole prefix).

Why per-node hashes rather than one key per block hash (llm-d's layout: block hash -> pods):
- Generations for free: a restarted node writes new keys, so its old entries are invisible the moment
  it registers, stale events cannot touch the live ones, and purging an incarnation is two UNLINKs.
- `cleared` is two UNLINKs too, and the index shrinks exactly as pools evict (an empty hash vanishes).

Why EVALSHA scripts rather than FUNCTION LOAD: a script is addressed by the hash of its text, so two
gateway versions with different scripts share one Redis without clashing over a library name, and
redis-py reloads a script transparently after a Redis restart (NOSCRIPT), where functions would need
an explicit reload step; it also works on servers and ACL users without FUNCTION rights. Either way
the scripts touch keys they compute from node ids, so the index needs a single primary (not Cluster).

Round trips: `apply`, `lookup`, `purge_node`, `sizes`: one each; `purge_dead`: two. `lookup_with_nodes`:
one, plus one to fetch records the first time a node incarnation is seen (records are immutable per
generation and cached). `resync`: two (upload into temporary keys, then swap them in atomically).
"""

from __future__ import annotations

import secrets
import struct

import msgspec
import redis.asyncio as aredis
from redis.exceptions import RedisError

from kvstore.events import AllCleared, BlockRemoved, BlockStored, KVEventBatch
from kvstore.nodes import NodeLoad, NodeRecord
from kvstore.registry import NodeRegistry, require_binary_responses

_decode_matches = msgspec.msgpack.Decoder(list[tuple[str, str, int, NodeLoad | None]]).decode

FULL, HELD = b"F", b"h"  # the state byte at the end of a `blk` value

_APPLY = """
-- ARGV: prefix, id, gen, then (op, parent, packed hashes) triples; op is s(tored), r(emoved) or
-- c(leared), parent is 8 bytes or empty. Events of any generation but the node's newest are dropped:
-- a zombie cannot write. Returns the number of entries added or removed, -1 if dropped.
local p, id, gen = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', p .. 'gen:' .. id) ~= gen then return -1 end
local blk = p .. 'blk:' .. id .. ':' .. gen
local kid = p .. 'kid:' .. id .. ':' .. gen

-- Give the held blocks in `kids` (a kid list) and their held descendants the state s ('F' or 'h').
-- A block that has it already ends the walk below it (its own descendants are consistent with it),
-- which also bounds every walk.
local function mark(kids, s)
  local todo = {kids}
  while #todo > 0 do
    local list = table.remove(todo)
    for j = 1, #list, 8 do
      local c = string.sub(list, j, j + 7)
      local v = redis.call('HGET', blk, c)
      if v and string.sub(v, -1) ~= s then
        redis.call('HSET', blk, c, string.sub(v, 1, -2) .. s)
        todo[#todo + 1] = redis.call('HGET', kid, c) or nil
      end
    end
  end
end

local function drop_kid(parent, h)
  local kids = redis.call('HGET', kid, parent)
  local at = 1
  while kids do
    local i = string.find(kids, h, at, true)
    if not i then return end
    if i % 8 == 1 then
      local rest = string.sub(kids, 1, i - 1) .. string.sub(kids, i + 8)
      if rest == '' then redis.call('HDEL', kid, parent) else redis.call('HSET', kid, parent, rest) end
      return
    end
    at = i + 1
  end
end

local function store(parent, packed)
  local s = 'F'
  if parent ~= '' then
    local v = redis.call('HGET', blk, parent)
    if not v or string.sub(v, -1) ~= 'F' then s = 'h' end
  end
  local added, siblings = 0, nil  -- siblings: parent's kid list when this loop has just read it
  for i = 1, #packed, 8 do
    local h = string.sub(packed, i, i + 7)
    local v = redis.call('HGET', blk, h)
    local kids = nil
    if v then
      s = string.sub(v, -1)  -- held already: its parent and state stand
    else
      redis.call('HSET', blk, h, parent .. s)
      if parent ~= '' then
        if siblings == nil then siblings = redis.call('HGET', kid, parent) or '' end
        redis.call('HSET', kid, parent, siblings .. h)
      end
      kids = redis.call('HGET', kid, h) or ''  -- blocks stored before h that name it as parent
      if s == 'F' and kids ~= '' then mark(kids, 'F') end
      added = added + 1
    end
    parent, siblings = h, kids
  end
  return added
end

local function remove(packed)
  local removed = 0
  for i = 1, #packed, 8 do
    local h = string.sub(packed, i, i + 7)
    local v = redis.call('HGET', blk, h)
    if v then
      redis.call('HDEL', blk, h)
      local parent = string.sub(v, 1, -2)
      if parent ~= '' then drop_kid(parent, h) end
      if string.sub(v, -1) == 'F' then mark(redis.call('HGET', kid, h) or '', 'h') end
      removed = removed + 1
    end
  end
  return removed
end

local changed = 0
for a = 4, #ARGV, 3 do
  local op = ARGV[a]
  if op == 'c' then
    redis.call('UNLINK', blk, kid)
  elseif op == 's' then
    changed = changed + store(ARGV[a + 1], ARGV[a + 2])
  else
    changed = changed + remove(ARGV[a + 2])
  end
end
if redis.call('EXISTS', blk) == 1 then
  redis.call('SADD', p .. 'blksets', id .. ':' .. gen)
else
  redis.call('SREM', p .. 'blksets', id .. ':' .. gen)
end
return changed
"""

_LOOKUP = """
-- ARGV: prefix, packed hashes. Returns, as one msgpack string (one bulk reply parses far faster in
-- the client than an array of 4 x nodes), [[id, gen, matched, load], ...] for every live node; load
-- is stored as msgpack already and goes in as it is. A node's match is the last block of the prefix
-- it holds in state F: blocks 1..i are all held exactly when block i is full, so: last block F ->
-- all of it; first block not F -> none; else a binary search between them. (Probing many blocks per
-- HMGET instead measured slower: in a large hash each extra field costs about as much as a call.)
local p, packed = ARGV[1], ARGV[2]
local n = #packed / 8
local function at(i) return string.sub(packed, 8 * i - 7, 8 * i) end
local function full(v) return v and string.byte(v, -1) == 70 end  -- 70 = 'F'
local function search(key, lo, hi)  -- block lo is full, block hi is not
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if full(redis.call('HGET', key, at(mid))) then lo = mid else hi = mid end
  end
  return lo
end
local first, last = at(1), at(n)
local function array(k) return k < 16 and string.char(0x90 + k) or string.char(0xdc) .. struct.pack('>H', k) end
local NIL = string.char(0xc0)
local out, count = {}, 0
for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local node = redis.call('HMGET', p .. 'node:' .. id, 'gen', 'load')
  local gen = node[1]
  if gen then
    local matched = 0
    if n > 0 then
      local key = p .. 'blk:' .. id .. ':' .. gen
      local ends = redis.call('HMGET', key, first, last)
      if full(ends[2]) then
        matched = n
      elseif full(ends[1]) then
        matched = search(key, 1, n)
      end
    end
    out[#out + 1] = array(4) .. cmsgpack.pack(id, gen, matched) .. (node[2] or NIL)
    count = count + 1
  end
end
return array(count) .. table.concat(out)
"""

_RESYNC_COMMIT = """
-- ARGV: prefix, id, gen, temporary blk key, temporary kid key, number of uploaded entries.
-- Swaps the uploads in if gen is still the node's newest. Returns 1 (done), 0 (stale generation)
-- or -1 (the upload expired before this call: nothing changed, upload again).
local p, id, gen, tmp_blk, tmp_kid, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
if redis.call('GET', p .. 'gen:' .. id) ~= gen then
  redis.call('UNLINK', tmp_blk, tmp_kid)
  return 0
end
if redis.call('HLEN', tmp_blk) ~= count then
  redis.call('UNLINK', tmp_blk, tmp_kid)
  return -1
end
local blk, kid = p .. 'blk:' .. id .. ':' .. gen, p .. 'kid:' .. id .. ':' .. gen
redis.call('UNLINK', blk, kid)
if count > 0 then
  redis.call('RENAME', tmp_blk, blk)
  redis.call('PERSIST', blk)
  redis.call('SADD', p .. 'blksets', id .. ':' .. gen)
else
  redis.call('SREM', p .. 'blksets', id .. ':' .. gen)
end
if redis.call('EXISTS', tmp_kid) == 1 then
  redis.call('RENAME', tmp_kid, kid)
  redis.call('PERSIST', kid)
end
return 1
"""

_PURGE_DEAD = """
-- ARGV: prefix. Unlinks the entries of every incarnation that is not its node's live one.
local p = ARGV[1]
local purged = {}
for _, m in ipairs(redis.call('SMEMBERS', p .. 'blksets')) do
  local id, gen = string.match(m, '^(.*):(%d+)$')
  if redis.call('HGET', p .. 'node:' .. id, 'gen') ~= gen then
    redis.call('UNLINK', p .. 'blk:' .. m, p .. 'kid:' .. m)
    redis.call('SREM', p .. 'blksets', m)
    purged[#purged + 1] = m
  end
end
return purged
"""

_PURGE_NODE = """
-- ARGV: prefix, id, gen
local m = ARGV[2] .. ':' .. ARGV[3]
redis.call('SREM', ARGV[1] .. 'blksets', m)
return redis.call('UNLINK', ARGV[1] .. 'blk:' .. m, ARGV[1] .. 'kid:' .. m)
"""

_SIZES = """
-- ARGV: prefix. Returns id, number of indexed blocks for every live node.
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local gen = redis.call('HGET', p .. 'node:' .. id, 'gen')
  if gen then
    out[#out + 1] = id
    out[#out + 1] = redis.call('HLEN', p .. 'blk:' .. id .. ':' .. gen)
  end
end
return out
"""

_RESYNC_CHUNK = 8192


class ResyncExpired(RedisError):
    """A resync's upload expired (or was removed) before it could be swapped in; nothing changed."""


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
                    parent = b"" if event.parent_hash is None else _pack([event.parent_hash])
                    args += ("s", parent, _pack(event.block_hashes))
            elif isinstance(event, BlockRemoved):
                if event.block_hashes:
                    args += ("r", b"", _pack(event.block_hashes))
            elif isinstance(event, AllCleared):
                args += ("c", b"", b"")
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

    async def resync(self, node_id: str, generation: int, blocks: list[tuple[int, int | None]]) -> bool:
        """Replace the node's whole entry set with `blocks`, (hash, parent hash) pairs, atomically
        (after a Redis restart or a lapsed heartbeat, the worker re-registers and republishes its
        pool). Two round trips.

        Returns False, changing nothing, if `generation` is not the node's newest registered one;
        raises ResyncExpired (a RedisError: callers retry) if the upload expired before the swap.
        Call it from the task that publishes the node's events: a batch applied during the upload
        would be overwritten by the swap.
        """
        entries, kids = block_entries(blocks)
        tmp = f"{self.prefix}tmp:{node_id}:{generation}:{secrets.token_hex(4)}"
        tmp_blk, tmp_kid = f"{tmp}:blk", f"{tmp}:kid"
        pipe = self.redis.pipeline(transaction=False)
        for key, mapping in ((tmp_blk, entries), (tmp_kid, kids)):
            items = list(mapping.items())
            for start in range(0, len(items), _RESYNC_CHUNK):
                pipe.hset(key, mapping=dict(items[start : start + _RESYNC_CHUNK]))
            pipe.pexpire(key, 120_000)  # an abandoned upload cleans itself up
        await pipe.execute()
        done = int(await self._resync_commit(args=[self.prefix, node_id, str(generation), tmp_blk, tmp_kid, len(entries)]))
        if done < 0:
            raise ResyncExpired(f"the resync upload of node {node_id!r} expired before it was swapped in; upload again")
        return bool(done)

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
        reply = _decode_matches(await self._lookup(args=[self.prefix, _pack(block_hashes)]))
        return [(node_id, int(gen), matched, load or NodeLoad()) for node_id, gen, matched, load in reply]


def block_entries(blocks: list[tuple[int, int | None]]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """The `blk` and `kid` hash contents for a node holding `blocks`, (hash, parent hash) pairs:
    what the apply script would have built from events, computed in one pass for a resync."""
    parents = dict(blocks)
    full: dict[int, bool] = {}
    for h in parents:
        path: list[int] = []
        on_path: set[int] = set()
        x = h
        while x not in full:
            path.append(x)
            on_path.add(x)
            parent = parents[x]
            if parent is None:
                verdict = True
                break
            if parent not in parents or parent in on_path:  # an ancestor is missing (or a cycle)
                verdict = False
                break
            x = parent
        else:
            verdict = full[x]
        for y in path:
            full[y] = verdict
    entries: dict[bytes, bytes] = {}
    kids: dict[bytes, bytes] = {}
    for h, parent in parents.items():
        packed_parent = b"" if parent is None else _pack([parent])
        entries[_pack([h])] = packed_parent + (FULL if full[h] else HELD)
        if parent is not None:
            kids[packed_parent] = kids.get(packed_parent, b"") + _pack([h])
    return entries, kids


def _pack(block_hashes: list[int]) -> bytes:
    try:
        return struct.pack(f"<{len(block_hashes)}Q", *block_hashes)
    except struct.error:
        bad = next((h for h in block_hashes if not (isinstance(h, int) and 0 <= h < 1 << 64)), None)
        raise ValueError(f"block hashes must be unsigned 64-bit ints, got {bad!r}") from None
