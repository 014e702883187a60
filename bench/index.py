"""Benchmark of the Redis block index: fill rate, lookup latency and memory per indexed block.

Starts a private Valkey, registers `nodes` nodes, fills `blocks` (node, block) entries through
`BlockIndex.apply`, then times lookups of one `prefix_blocks`-long prefix held fully by some nodes,
partly by others and not at all by the rest, as a router would see it.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from kvstore.events import BlockRemoved, BlockStored, KVEventBatch
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.registry import NodeRegistry
from kvstore.valkey import EmbeddedValkey, connect

# Fraction of the benchmark prefix held by node i (cycled): two full, three partial, three none.
_PREFIX_SHARE = (1.0, 1.0, 0.75, 0.25, 1 / 16, 0.0, 0.0, 0.0)
_CHAIN = 512  # blocks per stored event (one long conversation)
_EVENTS_PER_BATCH = 32


def run(blocks: int = 1_000_000, nodes: int = 8, prefix_blocks: int = 512, lookups: int = 2000) -> dict:
    """Run the benchmark on a fresh embedded Valkey; returns plain JSON-serializable numbers."""
    with EmbeddedValkey() as valkey:
        return asyncio.run(_run(valkey.url, blocks, nodes, prefix_blocks, lookups))


async def _run(url: str, blocks: int, nodes: int, prefix_blocks: int, lookups: int) -> dict:
    redis = await connect(url, timeout_s=60.0)
    try:
        registry = NodeRegistry(redis)
        index = BlockIndex(redis, registry=registry)
        rng = np.random.default_rng(0)
        prefix = rng.integers(0, 2**64, prefix_blocks, dtype=np.uint64, endpoint=False).tolist()

        gens = {}
        for i in range(nodes):
            node_id = f"node{i}"
            gens[node_id] = await registry.next_generation(node_id)
            record = NodeRecord(node_id, Role.BOTH, f"http://127.0.0.1:{8100 + i}", 16, "bench", blocks, gens[node_id])
            await registry.register(record, ttl_s=600)
        await index.lookup(prefix)  # loads the scripts, so their memory is not counted below
        await index.apply(KVEventBatch("node0", gens["node0"], []))
        before = await _used_memory(redis)

        batches, expected = _workload(rng, prefix, blocks, nodes, gens)
        t0 = time.perf_counter()
        for batch in batches:
            await index.apply(batch)
        fill_s = time.perf_counter() - t0
        indexed = sum((await index.sizes()).values())
        after = await _used_memory(redis)

        got = await index.lookup(prefix)
        if got != expected:
            raise AssertionError(f"lookup returned {got}, expected {expected}")
        for _ in range(min(100, lookups)):
            await index.lookup(prefix)
        await redis.config_resetstat()
        # Lookups interleaved with empty round trips (the floor set by the client and the machine),
        # so that both see the same noise on a shared machine.
        ping_us, lookup_us = await _timed_pair(lookups, redis.ping, lambda: index.lookup(prefix))
        server_us = (await redis.info("commandstats"))["cmdstat_evalsha"]["usec_per_call"]
        matches_us = await _timed(lookups, lambda: index.lookup_matches(prefix))  # what the router calls

        last = f"node{nodes - 1}"
        step = iter(rng.integers(0, 2**64, 4 * lookups, dtype=np.uint64, endpoint=False).tolist())

        def one_step():  # what a worker sends per engine step: two new blocks stored, two evicted
            stored = [next(step), next(step)]
            evicted = [next(step), next(step)]
            events = [BlockStored(stored), BlockRemoved(evicted)]
            return index.apply(KVEventBatch(last, gens[last], events))

        step_us = await _timed(lookups, one_step)
        info = await redis.info("server")
        baseline = await _per_block_key_bytes(redis, batches)
        return {
            "blocks": indexed,
            "nodes": nodes,
            "prefix_blocks": prefix_blocks,
            "lookups": lookups,
            "events_per_s": round(sum(_events(b) for b in batches) / fill_s),
            "fill_s": round(fill_s, 2),
            "ping_us": ping_us,
            "lookup_us": lookup_us,
            "lookup_server_us": round(server_us, 1),
            "lookup_matches_us": matches_us,
            "step_apply_us": step_us,
            "bytes_per_block": round((after - before) / max(indexed, 1), 1),
            "baseline_per_block_key_bytes_per_block": baseline,
            "matched_blocks": expected,
            "server": f"valkey {info.get('valkey_version', info.get('redis_version'))}",
        }
    finally:
        await redis.aclose()


def _workload(rng, prefix, blocks, nodes, gens) -> tuple[list[KVEventBatch], dict[str, int]]:
    """Event batches filling ~`blocks` entries over `nodes` nodes, and each node's expected match."""
    batches = []
    expected = {}
    per_node = blocks // nodes
    for i in range(nodes):
        node_id = f"node{i}"
        held = int(len(prefix) * _PREFIX_SHARE[i % len(_PREFIX_SHARE)])
        expected[node_id] = held
        rest = rng.integers(0, 2**64, max(per_node - held, 0), dtype=np.uint64, endpoint=False).tolist()
        chains = [prefix[:held]] if held else []
        chains += [rest[s : s + _CHAIN] for s in range(0, len(rest), _CHAIN)]
        for s in range(0, len(chains), _EVENTS_PER_BATCH):
            events = [BlockStored(c) for c in chains[s : s + _EVENTS_PER_BATCH]]  # each chain from its root
            batches.append(KVEventBatch(node_id, gens[node_id], events))
    return batches, expected


# The alternative layout, for comparison: one HASH per block hash, field node id -> generation.
_FILL_PER_BLOCK_KEYS = """
for a = 3, #ARGV do
  local packed = ARGV[a]
  for i = 1, #packed / 8 do redis.call('HSET', 'b:' .. string.sub(packed, 8 * i - 7, 8 * i), ARGV[1], ARGV[2]) end
end
"""


async def _per_block_key_bytes(redis, batches: list[KVEventBatch]) -> float:
    """Bytes per (node, block) entry of the per-block-key layout, filled with the same entries."""
    fill = redis.register_script(_FILL_PER_BLOCK_KEYS)
    await redis.flushall(asynchronous=False)
    before = await _used_memory(redis)
    for batch in batches:
        packed = [np.asarray(e.block_hashes, dtype="<u8").tobytes() for e in batch.events]
        await fill(args=[batch.node_id, str(batch.generation), *packed])
    after = await _used_memory(redis)
    entries = sum(_events(b) for b in batches)
    await redis.flushall(asynchronous=False)
    return round((after - before) / max(entries, 1), 1)


def _events(batch: KVEventBatch) -> int:
    return sum(len(e.block_hashes) for e in batch.events if isinstance(e, (BlockStored, BlockRemoved)))


async def _timed(n: int, call) -> dict[str, float]:
    samples = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        await call()
        samples[i] = (time.perf_counter_ns() - t0) / 1000
    return _percentiles(samples)


async def _timed_pair(n: int, baseline, call) -> tuple[dict[str, float], dict[str, float]]:
    """Time `baseline` and `call` alternately, n times each."""
    samples = np.empty((2, n))
    for i in range(n):
        for j, fn in enumerate((baseline, call)):
            t0 = time.perf_counter_ns()
            await fn()
            samples[j, i] = (time.perf_counter_ns() - t0) / 1000
    return _percentiles(samples[0]), _percentiles(samples[1])


def _percentiles(samples: np.ndarray) -> dict[str, float]:
    return {"p50": round(float(np.percentile(samples, 50)), 1), "p99": round(float(np.percentile(samples, 99)), 1)}


async def _used_memory(redis) -> int:
    await asyncio.sleep(0.2)  # let the server shrink client query buffers after big writes
    return int((await redis.info("memory"))["used_memory"])


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
