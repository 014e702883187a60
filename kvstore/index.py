"""The block index: which live node holds the longest prefix of a request's block hashes.

Per node incarnation (`{id}:{gen}`) a `blk` hash maps each held block to its parent plus a state byte,
`F` when the node holds the block's whole prefix, and a `kid` hash maps parents to children (key
layout: kvstore/lua/keys.lua). An inverted index, one SET per block hash of the incarnations holding
it in state F, answers lookups: the sets along a prompt are nested, so each node's longest prefix
comes from binary searches on their sizes, O(prefix blocks) and not O(nodes x blocks). Lookups read
only live generations, so a restarted node's old entries are invisible at once. docs/index.md has
the why, the costs and the round trips (`lookup`: one).
"""

from __future__ import annotations

import secrets
import struct
import time
from collections.abc import Iterable
from typing import NamedTuple

import msgspec
import numpy as np
import redis.asyncio as aredis
from redis.exceptions import RedisError

from kvstore.events import AllCleared, BlockRemoved, BlockStored, KVEventBatch
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.registry import NodeRegistry, scripts

LiveEntry = tuple[str, str, int, NodeLoad | None]  # a node's LIVE entry: id, generation, expires_at_ms, load


class LiveChanges(msgspec.Struct, array_like=True):
    """LIVE since the version a lookup named: its epoch and version now, and either the whole table
    (`whole`) or the entries changed and the node ids removed since."""

    epoch: str
    version: int
    whole: bool
    entries: list[LiveEntry]
    removed: list[str]


# The lookup's reply: server time (ms), LIVE's changes, and the match of each incarnation ('{id}:{gen}')
# holding the prompt's first block, as runs [matched, [incarnations]].
_decode_lookup = msgspec.msgpack.Decoder(tuple[int, LiveChanges, list[tuple[int, list[str]]]]).decode
_RESYNC_CHUNK = 8192
_HOLDERS_CHUNK = 2048  # blocks per holders_sync call after a resync (~1-2 ms of Redis each)
_GC_CHUNK = 2048  # retired entries swept per gc_step call


class ResyncExpired(RedisError):
    """A resync's upload expired (or was removed) before it could be swapped in; nothing changed."""


class BlockIndex:
    """Apply nodes' KV events and answer longest-prefix lookups across live nodes, on a client the
    caller owns (the registry's, by default through the same client)."""

    def __init__(self, redis: aredis.Redis, namespace: str = "akv", registry: NodeRegistry | None = None) -> None:
        self.redis = redis
        self.registry = registry or NodeRegistry(redis, namespace)
        self.prefix = self.registry.prefix
        (self._apply, self._lookup, self._resync_commit, self._purge_dead, self._purge_node, self._sizes, self._gc_step,
         self._holders_sync) = scripts(redis, "apply", "lookup", "resync_commit", "purge_dead", "purge_node", "sizes",
                                       "gc_step", "holders_sync")  # fmt: skip
        self._records: dict[str, NodeRecord] = {}  # node_id -> record of the generation last seen
        self.live = LiveTable()

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
        applied = int(await self._apply(args=args)) >= 0
        if applied and any(isinstance(event, AllCleared) for event in batch.events):
            await self.sweep()
        return applied

    async def lookup(self, block_hashes: list[int]) -> dict[str, int]:
        """For every live node, how many leading blocks of `block_hashes` it holds. One round trip."""
        rows, matched, alive = await self._lookup_rows(block_hashes)
        return {rows.ids[r]: int(matched[r]) for r in np.flatnonzero(alive)}

    async def lookup_matches(self, block_hashes: list[int]) -> Matches:
        """`lookup` over the live table's rows, each node's record and load at hand: what the router
        prices. One round trip, plus one the first time a node incarnation is seen (records are
        immutable per generation, so they are cached)."""
        rows, matched, alive = await self._lookup_rows(block_hashes)
        if unknown := np.flatnonzero(alive & ~rows.known).tolist():
            records = self._records
            if missing := [rows.ids[r] for r in unknown if (rec := records.get(rows.ids[r])) is None or rec.generation != rows.generations[r]]:
                records.update(await self.registry.get_many(missing))
            for r in unknown:  # one still unknown restarted between the two calls: it stays out
                if (rec := records.get(rows.ids[r])) is not None and rec.generation == rows.generations[r]:
                    rows.resolve(r, rec)
        return Matches(rows, matched, alive & rows.known)

    async def lookup_with_nodes(self, block_hashes: list[int]) -> list[tuple[NodeRecord, NodeLoad, int]]:
        """`lookup_matches` as (record, load, matched) per live node, in node id order."""
        rows, matched, usable = await self.lookup_matches(block_hashes)
        return [(rows.records[r], rows.load(r), int(matched[r])) for r in np.flatnonzero(usable)]

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
        if done:  # the holder sets follow the swapped-in content, a chunk per script call
            hashes = list(entries)
            for start in range(0, len(hashes), _HOLDERS_CHUNK):
                await self._holders_sync(args=[self.prefix, node_id, str(generation), b"".join(hashes[start : start + _HOLDERS_CHUNK])])
            await self.sweep()
        return bool(done)

    async def purge_node(self, node_id: str, generation: int) -> bool:
        """Drop every entry of one node incarnation now (e.g. on clean shutdown). True if there were any."""
        purged = bool(await self._purge_node(args=[self.prefix, node_id, str(generation)]))
        await self.sweep()
        return purged

    async def purge_dead(self) -> list[tuple[str, int]]:
        """Background cleanup, one round trip: drop the entries of expired nodes and of superseded
        generations, and forget expired node ids. Returns the purged (node_id, generation) pairs.
        Lookups never need this for correctness (they read only live generations); it bounds memory."""
        flat = await self._purge_dead(args=[self.prefix])
        await self.sweep()
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def sweep(self) -> None:
        """Drop retired incarnations' entries from the holder sets (kvstore/lua/gc_step.lua), a chunk
        per round trip, so no script blocks Redis for a whole pool. Idempotent; any caller may run it."""
        while int(await self._gc_step(args=[self.prefix, _GC_CHUNK])):
            pass

    async def sizes(self) -> dict[str, int]:
        """Indexed blocks per live node (should equal the node's cached full blocks)."""
        flat = await self._sizes(args=[self.prefix])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def _lookup_rows(self, block_hashes: list[int]) -> tuple[LiveRows, np.ndarray, np.ndarray]:
        """The live rows, each row's match and whether it had not expired at the lookup's time."""
        epoch, version = self.live.held()
        now_ms, changes, runs = _decode_lookup(await self._lookup(args=[self.prefix, _pack(block_hashes), epoch, version]))
        self.live.update(changes)
        rows = self.live.rows()
        matched, row_of = np.zeros(len(rows), dtype=np.int64), rows.row_of_incarnation
        for blocks, incarnations in runs:  # a later run overrides an earlier one
            matched[[r for inc in incarnations if (r := row_of.get(inc)) is not None]] = blocks
        return rows, matched, rows.expires_ms > now_ms


class LiveRows:
    """LIVE as rows in node id order, a numpy column per load field, joined with the node records:
    what a routing decision reads of every node. The router prices all rows at once; built and priced
    node by node in Python, 256 nodes took ~1 ms of a 2 ms decision budget. A heartbeat updates its
    row in place; a node joining, leaving or restarting makes the table build new rows."""

    def __init__(self, entries: Iterable[LiveEntry]) -> None:
        items = sorted(entries, key=lambda e: e[0])
        self.ids = [node_id for node_id, _, _, _ in items]
        self.generations = [int(gen) for _, gen, _, _ in items]
        loads = [load or NodeLoad() for _, _, _, load in items]
        self.row_of_id = {node_id: r for r, node_id in enumerate(self.ids)}
        self.row_of_incarnation = {f"{node_id}:{gen}": r for r, (node_id, gen, _, _) in enumerate(items)}
        self.expires_ms = np.array([expires for _, _, expires, _ in items], dtype=np.int64)
        columns = np.array([(x.running, x.waiting, x.free_blocks, x.total_blocks) for x in loads], dtype=np.int64).reshape(-1, 4)
        self.running, self.waiting, self.free_blocks, self.total_blocks = (np.ascontiguousarray(c) for c in columns.T)
        # Joined by BlockIndex from the registry: the record, role and (block size, model) of each row.
        self.records: list[NodeRecord | None] = [None] * len(items)
        self.known = np.zeros(len(items), dtype=bool)
        self.prefill_capable = np.zeros(len(items), dtype=bool)  # role prefill or both
        self.decode_capable = np.zeros(len(items), dtype=bool)  # role decode or both
        self.handover_tokens = np.zeros(len(items))  # NodeRecord.handover_tokens
        self.kinds: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def set_loads(self, beats: list[tuple[int, int, NodeLoad]]) -> None:
        """Heartbeats, (row, expires_at_ms, load), written into the columns at once (one numpy
        assignment per column: element by element, the 256 beats a lookup can bring took ~1 ms)."""
        at = [row for row, _, _ in beats]
        self.expires_ms[at] = [expires for _, expires, _ in beats]
        values = np.array([(x.running, x.waiting, x.free_blocks, x.total_blocks) for _, _, x in beats], dtype=np.int64)
        self.running[at], self.waiting[at], self.free_blocks[at], self.total_blocks[at] = values.T

    def load(self, row: int) -> NodeLoad:
        return NodeLoad(int(self.running[row]), int(self.waiting[row]), int(self.free_blocks[row]), int(self.total_blocks[row]))

    def resolve(self, row: int, record: NodeRecord) -> None:
        self.records[row], self.known[row] = record, True
        self.prefill_capable[row] = record.role in (Role.PREFILL, Role.BOTH)
        self.decode_capable[row] = record.role in (Role.DECODE, Role.BOTH)
        self.handover_tokens[row] = record.handover_tokens
        self.kinds.add((record.block_size, record.model_fingerprint))


class Matches(NamedTuple):
    """A lookup over the live rows: `matched[r]`, the prompt's leading blocks row r's node holds, and
    `usable[r]`, whether it is live and its record known (only those are routed to)."""

    rows: LiveRows
    matched: np.ndarray
    usable: np.ndarray

    @classmethod
    def of(cls, found: Iterable[tuple[NodeRecord, NodeLoad, int]]) -> Matches:
        """From (record, load, matched) per node: the cluster snapshot a router falls back on."""
        found = {rec.node_id: (rec, load, matched) for rec, load, matched in found}
        rows = LiveRows((rec.node_id, rec.generation, 0, load) for rec, load, _ in found.values())
        for r, node_id in enumerate(rows.ids):
            rows.resolve(r, found[node_id][0])
        matched = np.array([found[node_id][2] for node_id in rows.ids], dtype=np.int64)
        return cls(rows, matched, np.ones(len(rows), dtype=bool))


class LiveTable:
    """This client's copy of LIVE (every registered node's generation, expiry and load), kept current by
    the changes each lookup brings back: a lookup carries the few entries whose heartbeats landed since
    the previous one, not all of them (at 256 nodes the whole table was 27 KB a lookup).

    Lookups in flight together can come back out of order: a reply no newer than the copy is skipped
    (the copy already holds what it carries). A whole table is asked for again every `whole_every_s`:
    a primary that failed over may have lost a few writes (replication is asynchronous), and counting
    on from an older version would miss them for good.
    """

    def __init__(self, whole_every_s: float = 5.0, clock=time.monotonic) -> None:
        self.whole_every_s = whole_every_s
        self.clock = clock
        self.epoch = ""
        self.version = -1
        self.whole_at = float("-inf")
        self.entries: dict[str, LiveEntry] = {}  # id -> its entry as the lookup brought it
        self._rows: LiveRows | None = None  # built from entries when asked for, kept while no node joins or leaves

    def held(self) -> tuple[str, str]:
        """(epoch, version) to send: ('', '') asks for the whole table."""
        if self.version < 0 or self.clock() - self.whole_at > self.whole_every_s:
            return "", ""
        return self.epoch, str(self.version)

    def update(self, changes: LiveChanges) -> None:
        if changes.whole:
            if changes.epoch == self.epoch and changes.version < self.version:
                return  # an older whole table than the copy (replies out of order)
            self.entries, self._rows = {}, None
            self.whole_at = self.clock()
        elif changes.epoch != self.epoch or changes.version <= self.version:
            return
        rows, beats, entries = self._rows, [], self.entries
        for entry in changes.entries:
            entries[entry[0]] = entry
            if rows is not None:
                r = rows.row_of_id.get(entry[0])
                if r is not None and rows.generations[r] == int(entry[1]):
                    beats.append((r, entry[2], entry[3] or NodeLoad()))  # a heartbeat: the common change
                else:
                    self._rows = rows = None
        for node_id in changes.removed:
            if entries.pop(node_id, None) is not None:
                self._rows = rows = None
        if rows is not None and beats:
            rows.set_loads(beats)
        self.epoch, self.version = changes.epoch, changes.version

    def rows(self) -> LiveRows:
        if self._rows is None:
            self._rows = LiveRows(self.entries.values())
        return self._rows


def block_entries(blocks: list[tuple[int, int | None]]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """The `blk` and `kid` hash contents for a node holding `blocks`, (hash, parent hash) pairs:
    what the apply script would have built from events, computed in one pass for a resync."""
    parents = dict(blocks)
    kids: dict[int, list[int]] = {}
    for h, parent in parents.items():
        if parent is not None:
            kids.setdefault(parent, []).append(h)
    full = [h for h, parent in parents.items() if parent is None]
    for h in full:  # grows while it is walked: every block reachable from a root is full (a cycle never is)
        full.extend(kids.get(h, ()))
    full_set = set(full)
    entries = {
        _pack([h]): (b"" if parent is None else _pack([parent])) + (b"F" if h in full_set else b"h")
        for h, parent in parents.items()
    }
    return entries, {_pack([parent]): _pack(hs) for parent, hs in kids.items()}


def _pack(block_hashes: list[int]) -> bytes:
    try:
        return struct.pack(f"<{len(block_hashes)}Q", *block_hashes)
    except struct.error:
        bad = next((h for h in block_hashes if not (isinstance(h, int) and 0 <= h < 1 << 64)), None)
        raise ValueError(f"block hashes must be unsigned 64-bit ints, got {bad!r}") from None
