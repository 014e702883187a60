"""The registry, the index, sessions and stored responses on a real Valkey Cluster (issue 16 item 2).

A real local cluster (3 primaries, 3 replicas, cluster-node-timeout 1 s) started once for this module
from the embedded Valkey binary, reached through `connect("redis+cluster://...")` (a RedisCluster
client). The failover test kills -9 the primary serving the index's slot under a loop of index writes
and lookups, measures how long operations fail, and checks that a resync makes the index equal what
the node holds. The last test runs a real gateway and real workers (SmolLM2) on the cluster.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.errors import StateUnavailable
from gateway.ledger import Ledger
from gateway.responses_store import ResponseNotFound, ResponseStore, StoredResponse
from gateway.sessions import SessionStore
from kvstore.events import BlockRemoved, BlockStored, KVEventBatch
from kvstore.index import BlockIndex
from kvstore.nodes import NodeRecord, Role
from kvstore.registry import NodeRegistry
from kvstore.valkey import EmbeddedValkeyCluster, connect
from kvstore.wire import RouteStats

# The longest stretch in which index operations may fail while a replica takes over a killed primary
# (cluster-node-timeout 1 s + the election + the client's slot-map reload); measured 2-3 s here.
RECOVERY_BOUND_S = 6.0


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedValkeyCluster(primaries=3, replicas=1, node_timeout_ms=1000) as c:
        yield c


@pytest.fixture
def rc(cluster, aio):
    client = aio.run(connect(cluster.url))
    assert isinstance(client, RedisCluster)
    aio.run(client.flushall())  # every primary
    yield client
    aio.run(client.flushall())  # nodes a test registered must not refuse the next test's workers
    aio.run(client.aclose())


LEDGER = Ledger(fingerprint="fp", n_messages=2, context_digest=7, context_ids=[1, 2, 3], reply_ids=[4], reply_digest=9)


def _record(node_id: str, gen: int) -> NodeRecord:
    return NodeRecord(node_id, Role.BOTH, f"http://{node_id}", 16, "fp", 1000, gen)


def _chain(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


def test_the_cluster_spreads_slots_over_three_primaries(cluster, rc, aio):
    slots = aio.run(rc.cluster_slots())
    primaries = {(host, port) for (_, _), node in slots.items() for host, port in [(node["primary"][0], node["primary"][1])]}
    assert len(primaries) == 3
    assert sum(end - start + 1 for start, end in slots) == 16384


def test_registry_and_index_work_on_a_cluster(rc, aio):
    async def body():
        registry = NodeRegistry(rc, "akv")
        index = BlockIndex(rc, "akv", registry)
        gens = {n: await registry.next_generation(n) for n in ("n0", "n1")}
        for n, g in gens.items():
            await registry.register(_record(n, g), ttl_s=60)
        assert {rec.node_id for rec, _ in await registry.live_nodes()} == {"n0", "n1"}
        chain = _chain(random.Random(1), 8)
        assert await index.apply(KVEventBatch("n0", gens["n0"], [BlockStored(chain)]))
        assert await index.apply(KVEventBatch("n1", gens["n1"], [BlockStored(chain[:3])]))
        assert await index.lookup(chain) == {"n0": 8, "n1": 3}
        found = await index.lookup_with_nodes(chain)
        assert sorted((rec.node_id, m) for rec, _, m in found) == [("n0", 8), ("n1", 3)]
        assert await index.apply(KVEventBatch("n0", gens["n0"], [BlockRemoved(chain[5:6])]))
        assert (await index.lookup(chain))["n0"] == 5
        # A resync (temporary upload keys + a swap script) stays in the namespace's slot.
        blocks = [(h, p) for h, p in zip(chain, [None, *chain[:-1]])]
        assert await index.resync("n1", gens["n1"], blocks)
        assert await index.sizes() == {"n0": 7, "n1": 8}
        # Every registry and index key carries the namespace's hash tag: one slot.
        keys = [k async for k in rc.scan_iter(match="{akv}:*")]
        assert len({rc.keyslot(k) for k in keys}) == 1 and len(keys) >= 5
        new = await registry.next_generation("n1")
        await registry.register(_record("n1", new), ttl_s=60)
        assert await index.purge_dead() == [("n1", gens["n1"])]
        assert await index.purge_node("n0", gens["n0"])
        assert await registry.deregister("n0", gens["n0"])

    aio.run(body())


def test_sessions_and_responses_work_on_a_cluster_and_spread_over_slots(rc, aio):
    async def unpin(nodes: list[str], key: str) -> list[str]:
        return nodes

    async def body():
        store = SessionStore(rc, "akv", default_ttl_s=60, max_ttl_s=600, unpin=unpin)
        stats = RouteStats(decode_node="n0", prompt_tokens=40, cached_tokens=32)
        ids = [f"s{i}" for i in range(12)]
        for sid in ids:
            session = await store.open("tenant-a", sid)
            await store.record_turn(session, stats, completion_tokens=5, ledger=LEDGER)
        reopened = await store.open("tenant-a", "s3")
        assert reopened.node == "n0" and reopened.ledger == LEDGER
        got = await store.get("tenant-a", "s3")
        assert got.turns == 1 and got.cached_tokens == 32 and got.completion_tokens == 5
        assert {s.id for s in await store.list("tenant-a")} == set(ids)
        created, was_new = await store.create("tenant-a", None, 30)
        assert was_new and created.ttl_s == 30
        deleted = await store.end("tenant-a", "s3")
        assert deleted.unpinned_nodes == ["n0"]
        assert "s3" not in {s.id for s in await store.list("tenant-a")}
        # One session's keys share a slot; different sessions land on different slots (and primaries).
        slots = {sid: {rc.keyslot(k) for k in (store._keys("tenant-a", sid).hash, store._keys("tenant-a", sid).nodes,
                                                store._keys("tenant-a", sid).ledger)} for sid in ids}  # fmt: skip
        assert all(len(s) == 1 for s in slots.values())
        assert len({next(iter(s)) for s in slots.values()}) == len(ids)
        responses = ResponseStore(rc, store.prefix)
        record = StoredResponse(response={"id": "resp_1"}, session_id="s1", messages=[])
        await responses.save("tenant-a", record, ttl_s=60)
        assert (await responses.load("tenant-a", "resp_1")).session_id == "s1"
        await responses.delete("tenant-a", "resp_1")
        with pytest.raises(ResponseNotFound):
            await responses.load("tenant-a", "resp_1")

    aio.run(body())


def test_a_client_follows_the_index_slot_when_it_moves_to_another_primary(cluster, rc, aio):
    """Resharding: the namespace's slot (every registry and index key) migrates to another primary
    with MIGRATE and CLUSTER SETSLOT while a client holds the old slot map; its next calls get MOVED,
    and it follows without an error, answers unchanged."""
    import redis as sync_redis

    async def fill():
        registry = NodeRegistry(rc, "mv")
        index = BlockIndex(rc, "mv", registry)
        g = await registry.next_generation("n0")
        await registry.register(_record("n0", g), ttl_s=60)
        chain = _chain(random.Random(5), 16)
        await index.apply(KVEventBatch("n0", g, [BlockStored(chain)]))
        return index, chain

    index, chain = aio.run(fill())
    before = aio.run(index.lookup(chain))
    source = cluster.primary_of("{mv}:nodes")
    nodes = {n.port: sync_redis.Redis(host="127.0.0.1", port=n.port) for n in cluster.nodes if n.exit_code() is None}
    try:
        slot = int(nodes[source.port].execute_command("CLUSTER", "KEYSLOT", "{mv}:nodes"))
        ids = {port: c.execute_command("CLUSTER", "MYID").decode() for port, c in nodes.items()}
        primaries = {int(p[1]) for _, _, p, *_ in nodes[source.port].execute_command("CLUSTER", "SLOTS")}
        target = next(port for port in sorted(primaries) if port != source.port)
        nodes[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
        nodes[source.port].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while keys := nodes[source.port].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            nodes[source.port].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in primaries:  # the replicas learn it by gossip
            nodes[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        assert cluster.primary_of("{mv}:nodes").port == target
        assert aio.run(index.lookup(chain)) == before == {"n0": 16}  # MOVED, followed
        assert [r.node_id for r, _ in aio.run(index.registry.live_nodes())] == ["n0"]
    finally:
        for c in nodes.values():
            c.close()


@pytest.mark.heavy
def test_killing_the_index_primary_under_load_recovers_and_a_resync_converges(cluster, rc, aio):
    """kill -9 the primary serving the namespace's slot while a loop writes and looks up: its replica
    takes over, operations resume within RECOVERY_BOUND_S, and a resync (what a worker's publisher
    does after any Redis error) makes the index equal the node's pool, writes lost in the failover
    included."""
    rng = random.Random(7)

    async def body():
        registry = NodeRegistry(rc, "akv")
        index = BlockIndex(rc, "akv", registry)
        gen = await registry.next_generation("n0")
        record = _record("n0", gen)
        await registry.register(record, ttl_s=300)
        pool: list[list[int]] = []  # the node's blocks: what it stored, whether or not the index heard it
        ops: list[tuple[float, float, bool]] = []  # (start, end, ok)
        killed_at: float | None = None

        sessions = SessionStore(rc, "akv", default_ttl_s=300, max_ttl_s=600, unpin=None)
        session_ops: list[tuple[float, float, bool]] = []  # sessions live on every primary, the victim's too
        stats = RouteStats(decode_node="n0", prompt_tokens=64, cached_tokens=48)

        async def one_op() -> None:
            chain = _chain(rng, 4)
            pool.append(chain)
            start = time.monotonic()
            try:
                await index.apply(KVEventBatch("n0", gen, [BlockStored(chain)]))
                probe = rng.choice(pool)
                await index.lookup(probe)
                ops.append((start, time.monotonic(), True))
            except RedisError:
                ops.append((start, time.monotonic(), False))
                await asyncio.sleep(0.01)
            start = time.monotonic()
            try:
                session = await sessions.open("tenant-f", f"s{len(session_ops) % 24}")
                await sessions.record_turn(session, stats, completion_tokens=4, ledger=LEDGER)
                session_ops.append((start, time.monotonic(), True))
            except (RedisError, StateUnavailable):
                session_ops.append((start, time.monotonic(), False))

        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # steady load first
            await one_op()
        victim = cluster.primary_of("{akv}:nodes")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        last_failure = killed_at
        while time.monotonic() - last_failure < 2.0 and time.monotonic() - killed_at < 30.0:
            await one_op()
            for op in (ops[-1], session_ops[-1]):
                if not op[2]:
                    last_failure = op[1]
        assert time.monotonic() - killed_at < 30.0, "operations never recovered"
        after = [op for op in ops if op[0] >= killed_at]
        failed = [op for op in after if not op[2]]
        first_ok = next(op for op in after if op[2] and op[0] >= (failed[-1][1] if failed else killed_at))
        window_s = (failed[-1][1] if failed else first_ok[1]) - killed_at
        slowest_s = max(end - start for start, end, _ in after)
        print(f"\nfailover: {len(after)} ops after the kill, {len(failed)} failed; failures end {window_s:.2f} s "
              f"after the kill; slowest op {slowest_s:.2f} s; new primary {cluster.primary_of('{akv}:nodes').port} "
              f"(was {victim.port})")  # fmt: skip
        session_failures = [op for op in session_ops if op[0] >= killed_at and not op[2]]
        session_window_s = (session_failures[-1][1] - killed_at) if session_failures else 0.0
        print(f"sessions: {sum(1 for op in session_ops if op[0] >= killed_at)} turns recorded after the kill, "
              f"{len(session_failures)} failed; failures end {session_window_s:.2f} s after the kill; slowest "
              f"{max(end - start for start, end, _ in session_ops if start >= killed_at):.2f} s")  # fmt: skip
        assert window_s <= RECOVERY_BOUND_S and session_window_s <= RECOVERY_BOUND_S
        assert (await sessions.get("tenant-f", "s1")).turns >= 1
        assert cluster.primary_of("{akv}:nodes") is not victim
        # The worker's recovery: register again (a no-op if the record survived) and resync its pool.
        await registry.register(record, ttl_s=300)
        blocks = [(h, p) for chain in pool for h, p in zip(chain, [None, *chain[:-1]])]
        heard = (await index.sizes()).get("n0", 0)
        assert await index.resync("n0", gen, blocks)
        assert await index.sizes() == {"n0": len(blocks)}
        print(f"index before the resync: {heard} of {len(blocks)} blocks; after: {len(blocks)}")
        for chain in rng.sample(pool, 50):
            assert await index.lookup(chain) == {"n0": 4}

    try:
        aio.run(body())
    finally:
        victim_nodes = [n for n in cluster.nodes if n.exit_code() is not None]
        for node in victim_nodes:  # back as a replica of the promoted one (its nodes.conf remembers the cluster)
            node.restart()


@pytest.mark.heavy
def test_a_real_gateway_and_workers_on_the_cluster_serve_a_cached_session(cluster):
    """The real stack (a gateway, a prefill and a decode worker, SmolLM2) with `--redis-url
    redis+cluster://...`: an openai-client session of 3 turns, every turn after the first >= 90% cached."""
    from openai import OpenAI

    from agentkv.stack import Stack

    with Stack(port=0, redis_url=cluster.url).start(timeout_s=400) as stack:
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "system", "content": "You are a terse assistant. " + "Keep every answer short. " * 20},
                    {"role": "user", "content": "Name a colour."}]  # fmt: skip
        session = f"cluster-{time.time_ns()}"
        rows = []
        for turn in range(3):
            reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                                   extra_headers={"x-session-id": session})  # fmt: skip
            stats = reply.usage.model_extra["agentkv"]
            rows.append((reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens, stats["ledger"]))
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": f"And another one, number {turn + 2}."}]  # fmt: skip
        print("\nturn  prompt  cached  ledger")
        for turn, (prompt, cached, ledger) in enumerate(rows):
            print(f"{turn + 1:>4}  {prompt:>6}  {cached:>6}  {ledger or '-'}")
        for (prompt, cached, _), (previous, _, _) in zip(rows[1:], rows):
            assert cached >= 0.9 * previous, f"{cached} of the previous turn's {previous} prompt tokens cached"

        # Failover under real traffic: the primary holding the index, registry (and perhaps this
        # session) is killed -9 after the first of 8 more turns. No request may fail.
        cluster.wait_healthy()
        victim = cluster.primary_of("{akv}:nodes")
        outcomes = []
        for turn in range(8):
            if turn == 1:
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.monotonic()
            start = time.monotonic()
            try:
                reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                                       extra_headers={"x-session-id": session})  # fmt: skip
                stats = reply.usage.model_extra["agentkv"]
                outcomes.append((start, time.monotonic(), "ok", stats["mode"], reply.usage.prompt_tokens_details.cached_tokens))
                messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": f"One more, number {turn + 5}."}]  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a failed request is what is measured
                outcomes.append((start, time.monotonic(), type(exc).__name__, "-", 0))
                print(f"turn {turn + 4} failed: {str(exc)[:300]}")
        print("\nturn  start after kill  took   outcome  mode      cached")
        for n, (start, end, outcome, mode, cached) in enumerate(outcomes):
            print(f"{n + 4:>4}  {start - killed_at:>15.2f}  {end - start:>5.2f}  {outcome:<7}  {mode:<8}  {cached:>6}")
        assert cluster.primary_of("{akv}:nodes") is not victim
        assert all(outcome == "ok" for _, _, outcome, _, _ in outcomes), "a request failed during the failover"
        assert outcomes[-1][4] > 0, "the session's cache hits did not come back after the failover"
        victim.restart()
