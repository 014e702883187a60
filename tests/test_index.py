"""The block index against a real Valkey: longest-prefix lookups, generations, cleanup and resync."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.events import AllCleared, BlockRemoved, BlockStored, KVEventBatch
from kvstore.index import BlockIndex, LiveChanges, LiveTable, ResyncExpired, block_entries
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.registry import NodeRegistry

_rng = random.Random(1234)
# Three chains of block hashes; B shares its first 4 blocks with A (a common system prompt). Some
# hashes are >= 2**63 on purpose: hashes are unsigned 64-bit.
CHAIN_A = [_rng.getrandbits(64) | (1 << 63) if i % 3 == 0 else _rng.getrandbits(64) for i in range(10)]
CHAIN_B = CHAIN_A[:4] + [_rng.getrandbits(64) for _ in range(6)]
CHAIN_C = [_rng.getrandbits(64) for _ in range(10)]
CHAINS = [CHAIN_A, CHAIN_B, CHAIN_C]
ALL_HASHES = sorted(set(CHAIN_A + CHAIN_B + CHAIN_C))
PARENT = {h: chain[i - 1] if i else None for chain in CHAINS for i, h in enumerate(chain)}
NODES = ["n0", "n1", "n2"]


def record(node_id: str, generation: int, **overrides) -> NodeRecord:
    fields = dict(role=Role.BOTH, address=f"http://{node_id}", block_size=16, model_fingerprint="m",
                  capacity_blocks=1000, generation=generation)  # fmt: skip
    fields.update(overrides)
    return NodeRecord(node_id=node_id, **fields)


async def join(registry: NodeRegistry, node_id: str, ttl_s: float = 60.0, **overrides) -> int:
    """Start a node incarnation the way a worker does; returns its generation."""
    generation = await registry.next_generation(node_id)
    await registry.register(record(node_id, generation, **overrides), ttl_s)
    return generation


def segment(chain: list[int], start: int, stop: int | None = None) -> BlockStored:
    """Blocks chain[start:stop] stored, with their true parent (the block before `start`)."""
    return BlockStored(chain[start:stop], chain[start - 1] if start else None)


def stored(node_id: str, generation: int, chain: list[int], start: int = 0, stop: int | None = None) -> KVEventBatch:
    return KVEventBatch(node_id, generation, [segment(chain, start, stop)])


def chain_blocks(chain: list[int]) -> set[tuple[int, int | None]]:
    """(hash, parent) pairs of a chain, as a pool reports them for a resync."""
    return {(h, chain[i - 1] if i else None) for i, h in enumerate(chain)}


def leading(held: set[int], prefix: list[int]) -> int:
    """The reference answer: how many leading blocks of `prefix` are in `held`."""
    count = 0
    for h in prefix:
        if h not in held:
            break
        count += 1
    return count


# ---------------------------------------------------------------------------------- property test

event_strategy = st.one_of(
    st.tuples(st.just("stored"), st.integers(0, 2), st.integers(0, 10), st.integers(0, 10)),
    st.tuples(st.just("removed"), st.lists(st.sampled_from(ALL_HASHES), min_size=1, max_size=4)),
    st.tuples(st.just("cleared")),
)
batch_strategy = st.tuples(
    st.integers(0, 2),  # node
    st.booleans(),  # sent by the node's previous (stale) incarnation?
    st.lists(event_strategy, min_size=1, max_size=4),
)


def to_event(spec: tuple):
    if spec[0] == "stored":
        _, chain, a, b = spec
        return segment(CHAINS[chain], min(a, b), max(a, b))
    if spec[0] == "removed":
        return BlockRemoved(list(spec[1]))
    return AllCleared()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(batch_strategy, min_size=1, max_size=8), cut=st.integers(0, 10))
def test_lookup_equals_a_reference_model_for_random_event_sequences(aio, redis_client, batches, cut):
    async def body():
        await redis_client.flushall()
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        stale = {n: await join(registry, n) for n in NODES}
        live = {n: await join(registry, n) for n in NODES}  # a restart: `stale` is now superseded
        reference: dict[str, set[int]] = {n: set() for n in NODES}

        for node, from_stale, specs in batches:
            node_id = NODES[node]
            events = [to_event(s) for s in specs]
            generation = stale[node_id] if from_stale else live[node_id]
            applied = await index.apply(KVEventBatch(node_id, generation, events))
            assert applied is not from_stale
            if not from_stale:
                for event in events:
                    if isinstance(event, BlockStored):
                        reference[node_id] |= set(event.block_hashes)
                    elif isinstance(event, BlockRemoved):
                        reference[node_id] -= set(event.block_hashes)
                    else:
                        reference[node_id].clear()

            for prefix in [*CHAINS, CHAIN_B[:cut], []]:
                expected = {n: leading(reference[n], prefix) for n in NODES}
                assert await index.lookup(prefix) == expected
        assert await index.sizes() == {n: len(reference[n]) for n in NODES}
        for n in NODES:  # what the events built, state bytes included, is what a resync would upload
            entries, kids = block_entries([(h, PARENT[h]) for h in reference[n]])
            assert await redis_client.hgetall(f"{{akv}}:blk:{n}:{live[n]}") == entries
            got_kids = await redis_client.hgetall(f"{{akv}}:kid:{n}:{live[n]}")
            assert {p: sorted(_split(v)) for p, v in got_kids.items()} == {p: sorted(_split(v)) for p, v in kids.items()}
        # The inverted index (block -> incarnations holding it in state F) agrees with the blk hashes.
        expected_holders: dict[bytes, set[bytes]] = {}
        for n in NODES:
            entries, _ = block_entries([(h, PARENT[h]) for h in reference[n]])
            for h, v in entries.items():
                if v.endswith(b"F"):
                    expected_holders.setdefault(h, set()).add(f"{n}:{live[n]}".encode())
        assert await holder_sets(redis_client) == expected_holders

    aio.run(body())


async def holder_sets(redis) -> dict[bytes, set[bytes]]:
    """Every `f:{hash}` holder set of the akv namespace, by raw block hash."""
    prefix = b"{akv}:f:"
    return {key[len(prefix) :]: await redis.smembers(key) async for key in redis.scan_iter(match=b"{akv}:f:*")}


def _split(packed: bytes) -> list[bytes]:
    return [packed[i : i + 8] for i in range(0, len(packed), 8)]


# ------------------------------------------------------------------------------------ examples


def test_lookup_counts_only_leading_blocks_and_stops_at_the_first_miss(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g0, g1 = await join(registry, "n0"), await join(registry, "n1")
        await index.apply(KVEventBatch("n0", g0, [segment(CHAIN_A, 0, 2), segment(CHAIN_A, 3)]))  # block 2 missing
        await index.apply(stored("n1", g1, CHAIN_A, 1))  # block 0 missing
        assert await index.lookup(CHAIN_A) == {"n0": 2, "n1": 0}

    aio.run(body())


def test_a_stored_parent_completes_the_blocks_below_it_and_a_removed_one_cuts_them(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g = await join(registry, "n0")
        # Tail first, then the middle, then the head: nothing is reachable until the head arrives.
        await index.apply(KVEventBatch("n0", g, [segment(CHAIN_A, 6), segment(CHAIN_A, 2, 6)]))
        assert await index.lookup(CHAIN_A) == {"n0": 0}
        await index.apply(stored("n0", g, CHAIN_A, 0, 2))
        assert await index.lookup(CHAIN_A) == {"n0": 10}
        await index.apply(KVEventBatch("n0", g, [BlockRemoved([CHAIN_A[4]])]))
        assert await index.lookup(CHAIN_A) == {"n0": 4}
        assert await index.lookup(CHAIN_B) == {"n0": 4}  # B branches off A after block 3
        await index.apply(stored("n0", g, CHAIN_A, 4, 5))
        assert await index.lookup(CHAIN_A) == {"n0": 10}
        assert await index.sizes() == {"n0": 10}

    aio.run(body())


def test_lookup_reports_every_live_node_even_without_a_match(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        await join(registry, "n0")
        await join(registry, "n1")
        assert await index.lookup(CHAIN_A) == {"n0": 0, "n1": 0}
        assert await index.lookup([]) == {"n0": 0, "n1": 0}

    aio.run(body())


def test_lookup_reports_more_nodes_than_a_small_msgpack_array_holds(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        gens = {f"n{i:02d}": await join(registry, f"n{i:02d}") for i in range(17)}
        await index.apply(stored("n16", gens["n16"], CHAIN_A, 0, 5))
        assert await index.lookup(CHAIN_A) == {n: 5 if n == "n16" else 0 for n in gens}

    aio.run(body())


def test_lookup_handles_long_prefixes(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g = await join(registry, "n0")
        rng = random.Random(7)
        long_prefix = [rng.getrandbits(64) for _ in range(5000)]
        await index.apply(stored("n0", g, long_prefix, 0, 4500))
        assert await index.lookup(long_prefix) == {"n0": 4500}
        await index.apply(KVEventBatch("n0", g, [BlockRemoved([long_prefix[2999]])]))
        assert await index.lookup(long_prefix) == {"n0": 2999}

    aio.run(body())


def test_lookup_ignores_a_node_whose_heartbeat_expired(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g0 = await join(registry, "n0", ttl_s=1.0)
        g1 = await join(registry, "n1", ttl_s=60.0)
        await index.apply(stored("n0", g0, CHAIN_A))
        await index.apply(stored("n1", g1, CHAIN_A, 0, 3))
        assert await index.lookup(CHAIN_A) == {"n0": 10, "n1": 3}
        await asyncio.sleep(1.2)
        assert await index.lookup(CHAIN_A) == {"n1": 3}
        assert [n for n, _ in await index.purge_dead()] == ["n0"]
        assert await redis_client.exists(f"{{akv}}:blk:n0:{g0}") == 0
        assert all(m == {b"n1:" + str(g1).encode()} for m in (await holder_sets(redis_client)).values())

    aio.run(body())


def test_lookup_ignores_entries_of_a_restarted_node_at_once(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        old = await join(registry, "n0")
        await index.apply(stored("n0", old, CHAIN_A))
        new = await join(registry, "n0")  # the worker restarted with an empty pool
        assert new > old
        assert await index.lookup(CHAIN_A) == {"n0": 0}
        # The old incarnation, still running somewhere, cannot write into the index any more.
        assert await index.apply(stored("n0", old, CHAIN_C)) is False
        assert await index.apply(stored("n0", new, CHAIN_B, 0, 2)) is True
        assert await index.lookup(CHAIN_A) == {"n0": 2}
        assert await index.purge_dead() == [("n0", old)]
        assert await redis_client.exists(f"{{akv}}:blk:n0:{old}") == 0
        assert await index.lookup(CHAIN_A) == {"n0": 2}
        assert len(await holder_sets(redis_client)) == 2  # the purged incarnation left no holder entries

    aio.run(body())


def test_purge_node_drops_one_incarnation_now(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g = await join(registry, "n0")
        await index.apply(stored("n0", g, CHAIN_A))
        assert await index.purge_node("n0", g) is True
        assert await index.lookup(CHAIN_A) == {"n0": 0}
        assert await holder_sets(redis_client) == {}
        assert await index.purge_node("n0", g) is False

    aio.run(body())


def test_removing_every_block_leaves_no_block_keys(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        gens = {n: await join(registry, n) for n in NODES}
        for n, g in gens.items():
            await index.apply(KVEventBatch(n, g, [segment(CHAIN_A, 0), segment(CHAIN_C, 0)]))
        assert await index.sizes() == {n: 20 for n in NODES}
        for n, g in gens.items():
            await index.apply(KVEventBatch(n, g, [BlockRemoved(CHAIN_A), BlockRemoved(CHAIN_C)]))
        assert await index.sizes() == {n: 0 for n in NODES}
        assert await redis_client.keys("{akv}:blk:*") == [] and await redis_client.keys("{akv}:kid:*") == []
        assert await redis_client.scard("{akv}:blksets") == 0
        assert await holder_sets(redis_client) == {}

    aio.run(body())


def test_cleared_drops_all_of_the_nodes_entries_and_only_its(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g0, g1 = await join(registry, "n0"), await join(registry, "n1")
        await index.apply(stored("n0", g0, CHAIN_A))
        await index.apply(stored("n1", g1, CHAIN_A))
        await index.apply(KVEventBatch("n0", g0, [AllCleared(), segment(CHAIN_C, 0, 1)]))
        assert await index.lookup(CHAIN_A) == {"n0": 0, "n1": 10}
        assert await index.sizes() == {"n0": 1, "n1": 10}
        assert sum(len(m) for m in (await holder_sets(redis_client)).values()) == 11

    aio.run(body())


def test_resync_makes_the_index_exact_after_a_redis_restart(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g = await join(registry, "n0")
        await index.apply(stored("n0", g, CHAIN_A))
        await redis_client.flushall()  # Redis restarted without persistence

        # The worker notices (its heartbeat and events are refused), re-registers and resyncs.
        assert await registry.heartbeat("n0", g, NodeLoad(), ttl_s=60) is False
        assert await index.apply(stored("n0", g, CHAIN_B)) is False
        await registry.register(record("n0", g), ttl_s=60)
        pool = chain_blocks(CHAIN_A[:6]) | chain_blocks(CHAIN_C)
        assert await index.resync("n0", g, sorted(pool)) is True
        assert await index.lookup(CHAIN_A) == {"n0": 6}
        assert await index.lookup(CHAIN_C) == {"n0": 10}
        assert await index.sizes() == {"n0": len(pool)}
        assert await redis_client.keys("{akv}:tmp:*") == []

    aio.run(body())


def test_resync_replaces_the_whole_entry_set_and_refuses_a_stale_generation(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        old = await join(registry, "n0")
        await index.apply(stored("n0", old, CHAIN_A))
        assert await index.resync("n0", old, sorted(chain_blocks(CHAIN_C))) is True
        assert await index.lookup(CHAIN_A) == {"n0": 0}
        assert await index.lookup(CHAIN_C) == {"n0": 10}
        assert await index.resync("n0", old, []) is True
        assert await index.sizes() == {"n0": 0}

        new = await join(registry, "n0")
        assert await index.resync("n0", old, sorted(chain_blocks(CHAIN_A))) is False
        assert await index.lookup(CHAIN_A) == {"n0": 0}
        assert await redis_client.keys(f"{{akv}}:*:n0:{old}*") == []
        assert new > old

    aio.run(body())


def test_a_resync_whose_upload_expired_changes_nothing_and_says_so(aio, redis_client, monkeypatch):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g = await join(registry, "n0")
        await index.apply(stored("n0", g, CHAIN_A))
        commit = index._resync_commit

        async def expire_first(args):  # the upload's TTL ran out before the swap
            await redis_client.delete(args[3], args[4])
            return await commit(args=args)

        monkeypatch.setattr(index, "_resync_commit", expire_first)
        with pytest.raises(ResyncExpired):
            await index.resync("n0", g, sorted(chain_blocks(CHAIN_C)))
        assert await index.lookup(CHAIN_A) == {"n0": 10}  # the old entries stand
        assert await index.lookup(CHAIN_C) == {"n0": 0}

    aio.run(body())


# ------------------------------------------------------------------ LIVE: only what changed comes back


def spy_on_live(index: BlockIndex) -> list[LiveChanges]:
    """Record the LIVE changes every lookup of `index` brings back."""
    seen: list[LiveChanges] = []
    update = index.live.update
    index.live.update = lambda changes: (seen.append(changes), update(changes))[1]
    return seen


def test_a_lookup_brings_back_only_the_live_entries_changed_since_the_last_one(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        gens = {f"n{i:02d}": await join(registry, f"n{i:02d}") for i in range(20)}
        seen = spy_on_live(index)
        await index.lookup(CHAIN_A)
        assert seen[-1].whole and len(seen[-1].entries) == 20
        await index.lookup(CHAIN_A)
        assert not seen[-1].whole and seen[-1].entries == [] and seen[-1].removed == []

        await registry.heartbeat("n07", gens["n07"], NodeLoad(running=3, waiting=1, free_blocks=5, total_blocks=9), 60.0)
        found = {rec.node_id: load for rec, load, _ in await index.lookup_with_nodes(CHAIN_A)}
        assert not seen[-1].whole and [e[0] for e in seen[-1].entries] == ["n07"]
        assert found["n07"] == NodeLoad(running=3, waiting=1, free_blocks=5, total_blocks=9) and len(found) == 20

        await registry.deregister("n03", gens["n03"])
        new = await join(registry, "n20")
        assert set(await index.lookup(CHAIN_A)) == set(gens) - {"n03"} | {"n20"}
        assert seen[-1].removed == ["n03"] and [e[0] for e in seen[-1].entries] == ["n20"]
        assert {rec.node_id: rec.generation for rec, _, _ in await index.lookup_with_nodes(CHAIN_A)}["n20"] == new

    aio.run(body())


def test_a_client_far_behind_or_on_a_flushed_redis_reads_the_whole_table(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g0 = await join(registry, "n0")
        await join(registry, "n1")
        seen = spy_on_live(index)
        assert await index.lookup(CHAIN_A) == {"n0": 0, "n1": 0}
        many = [f"m{i:04d}" for i in range(1001)]  # more nodes changed than a lookup lists one by one
        for node_id in many:
            await join(registry, node_id)
        await registry.heartbeat("n0", g0, NodeLoad(running=2), 60.0)
        found = {rec.node_id: load for rec, load, _ in await index.lookup_with_nodes(CHAIN_A)}
        assert seen[-1].whole and set(found) == {"n0", "n1", *many} and found["n0"].running == 2

        # A flushed (or restarted) Redis counts versions again from 1, under a new epoch: the old
        # copy must go even once the new count passes the version the client held.
        held = index.live.version
        await redis_client.flushall()
        g2 = await join(registry, "n2")
        for _ in range(held + 5):
            await registry.heartbeat("n2", g2, NodeLoad(), 60.0)
        await index.apply(stored("n2", g2, CHAIN_A, 0, 4))
        assert await index.lookup(CHAIN_A) == {"n2": 4} and seen[-1].whole

    aio.run(body())


def test_the_live_copy_never_goes_back_to_an_older_reply_and_rereads_everything_now_and_then():
    now = [0.0]
    live = LiveTable(whole_every_s=5.0, clock=lambda: now[0])
    entry = lambda node_id, running: (node_id, "1", 10**15, NodeLoad(running=running))
    assert live.held() == ("", "")
    live.update(LiveChanges("e1", 10, True, [entry("a", 0), entry("b", 0)], []))
    assert live.held() == ("e1", "10")
    live.update(LiveChanges("e1", 12, False, [entry("a", 2)], ["b"]))
    live.update(LiveChanges("e1", 11, False, [entry("a", 1), entry("b", 1)], []))  # older, arrived later
    live.update(LiveChanges("e1", 9, True, [entry("b", 0)], []))  # an older whole table
    assert live.version == 12 and list(live.entries) == ["a"] and live.entries["a"][3].running == 2
    live.update(LiveChanges("e2", 3, True, [entry("c", 0)], []))  # a new epoch: its first whole table wins
    assert list(live.entries) == ["c"] and live.held() == ("e2", "3")
    now[0] = 5.1
    assert live.held() == ("", "")


def test_lookup_with_nodes_returns_each_nodes_record_load_and_match(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g0 = await join(registry, "n0", role=Role.PREFILL)
        g1 = await join(registry, "n1", role=Role.DECODE)
        await index.apply(stored("n0", g0, CHAIN_A, 0, 3))
        await index.apply(stored("n1", g1, CHAIN_A, 0, 7))
        load = NodeLoad(running=3, waiting=1, free_blocks=10, total_blocks=1000)
        await registry.heartbeat("n1", g1, load, ttl_s=60)

        result = sorted(await index.lookup_with_nodes(CHAIN_A), key=lambda r: -r[2])
        assert [(rec.node_id, rec.role, matched) for rec, _, matched in result] == [
            ("n1", Role.DECODE, 7),
            ("n0", Role.PREFILL, 3),
        ]
        assert result[0][1] == load
        # A restarted node is reported with its new record, not the cached one.
        await join(registry, "n1", role=Role.BOTH)
        result = sorted(await index.lookup_with_nodes(CHAIN_A), key=lambda r: -r[2])
        assert [(rec.node_id, rec.role, matched) for rec, _, matched in result] == [
            ("n0", Role.PREFILL, 3),
            ("n1", Role.BOTH, 0),
        ]

    aio.run(body())


def test_apply_rejects_hashes_that_are_not_unsigned_64_bit(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g = await join(registry, "n0")
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            await index.apply(stored("n0", g, [1, -5]))
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            await index.lookup([1 << 64])

    aio.run(body())


def test_lookup_finds_every_nodes_match_among_many_lengths_and_stale_incarnations(aio, redis_client):
    """The inverted lookup splits the prompt into runs of equal holder count: 40 nodes holding
    prefixes of random lengths (ties, zeros, the whole prompt), half of them restarted after holding a
    longer prefix (their stale holder entries must not count), checked against the plain answer."""
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        rng = random.Random(3)
        prompt = [rng.getrandbits(64) for _ in range(64)]
        expected = {}
        for i in range(40):
            node = f"m{i}"
            if i % 2:
                old = await join(registry, node)
                await index.apply(stored(node, old, prompt, 0, 64))
            g = await join(registry, node)
            length = rng.choice([0, 1, 5, 5, 17, 63, 64, rng.randrange(65)])
            if length:
                await index.apply(stored(node, g, prompt, 0, length))
            await index.apply(stored(node, g, [rng.getrandbits(64) for _ in range(8)]))  # an unrelated chain
            expected[node] = length
        assert await index.lookup(prompt) == expected
        for cut in (1, 5, 30, 63):
            assert await index.lookup(prompt[:cut]) == {n: min(m, cut) for n, m in expected.items()}
        # Holder sets that are not nested (a retired incarnation half swept, in any pattern) change
        # no live node's answer.
        for ghost in range(6):
            for h in rng.sample(prompt, rng.randrange(1, 64)):
                await redis_client.sadd(b"{akv}:f:" + struct.pack("<Q", h), f"ghost{ghost}:1")
        assert await index.lookup(prompt) == expected
        for cut in (1, 5, 30, 63):
            assert await index.lookup(prompt[:cut]) == {n: min(m, cut) for n, m in expected.items()}

    aio.run(body())


def test_resync_purge_and_clear_leave_exact_holder_sets_and_no_garbage(aio, redis_client):
    """Resync, clear and purge retire a whole blk hash in O(1) and sweep its holder entries in chunks
    afterwards: when they return, the holder sets are exactly the live F blocks, with nothing left over."""
    async def body():
        registry = NodeRegistry(redis_client)
        index = BlockIndex(redis_client, registry=registry)
        g0, g1 = await join(registry, "n0"), await join(registry, "n1")
        rng = random.Random(11)
        chains = [[rng.getrandbits(64) for _ in range(300)] for _ in range(20)]  # 6,000 blocks: several sweep chunks
        for chain in chains:
            await index.apply(stored("n0", g0, chain))
            await index.apply(stored("n1", g1, chain, 0, 100))
        kept = chains[::2]  # the resync keeps half the chains and adds a new one
        fresh = [rng.getrandbits(64) for _ in range(50)]
        assert await index.resync("n0", g0, sorted(set().union(*(chain_blocks(c) for c in [*kept, fresh])), key=str))
        def holders_of(node: str, gen: int, chains: list[list[int]]) -> dict[bytes, set[bytes]]:
            return {struct.pack("<Q", h): {f"{node}:{gen}".encode()} for c in chains for h in c}
        expected = holders_of("n0", g0, [*kept, fresh])
        for h, m in holders_of("n1", g1, [c[:100] for c in chains]).items():
            expected.setdefault(h, set()).update(m)
        assert await holder_sets(redis_client) == expected
        assert await redis_client.keys("{akv}:gc*") == [] or await redis_client.keys("{akv}:gc*") == [b"{akv}:gcseq"]
        await index.apply(KVEventBatch("n1", g1, [AllCleared(), segment(fresh, 0, 10)]))
        assert await holder_sets(redis_client) == {**holders_of("n0", g0, [*kept, fresh]), **{
            struct.pack("<Q", h): {f"n0:{g0}".encode(), f"n1:{g1}".encode()} for h in fresh[:10]}}
        assert await index.lookup(fresh) == {"n0": 50, "n1": 10}
        assert await index.purge_node("n0", g0)
        assert await holder_sets(redis_client) == holders_of("n1", g1, [fresh[:10]])
        assert await redis_client.scard("{akv}:gcs") == 0

    aio.run(body())


def test_live_rows_follow_heartbeats_in_place_and_are_rebuilt_when_a_node_joins_or_leaves():
    live = LiveTable()
    entry = lambda node_id, gen, running: (node_id, str(gen), 10**15, NodeLoad(running=running, free_blocks=7, total_blocks=9))
    live.update(LiveChanges("e", 1, True, [entry("b", 1, 0), entry("a", 1, 0)], []))
    rows = live.rows()
    assert rows.ids == ["a", "b"] and rows.row_of_incarnation == {"a:1": 0, "b:1": 1}
    live.update(LiveChanges("e", 2, False, [entry("b", 1, 3)], []))  # a heartbeat
    assert live.rows() is rows and rows.running.tolist() == [0, 3] and rows.free_blocks.tolist() == [7, 7]
    live.update(LiveChanges("e", 3, False, [entry("b", 2, 0)], []))  # b restarted: a new generation
    assert live.rows() is not rows and live.rows().row_of_incarnation == {"a:1": 0, "b:2": 1}
    rows = live.rows()
    live.update(LiveChanges("e", 4, False, [entry("c", 1, 1)], ["a"]))
    assert live.rows().ids == ["b", "c"] and live.rows().running.tolist() == [0, 1]
