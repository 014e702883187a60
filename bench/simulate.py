"""`agentkv bench simulate`: the real router and the real Redis index at 4 to 256 nodes, with
simulated workers.

What is real: the block hashes (kvstore.hashing over the workload's token ids), the index (a
private Valkey, `BlockIndex.apply` / `lookup`, the same Lua the gateway and workers run), the
node registry and the gateway's router (`gateway.router.Router.choose`, on simulated time, with
nodes heartbeating their loads as workers do). What is modelled:
the workers (bench/workersim.py: prefill seconds per token, decode step by batch, transfer seconds
per block, calibrated from this machine's benches) and their pools, an LRU of `capacity_blocks`
block hashes per node whose stores and evictions reach the index as the KV events real workers
publish.

Policies: `prefix_aware` (the index and the cost function, which may prefill on one node and move
only the blocks the decode node lacks), `prefix_aware_full` (the same choices, but every block of
the prompt moves), `sticky` (a session's first call goes to the next node in turn, later calls
where it went, like gateway.router.choose_baseline), `round_robin` and `random`.
Every policy sees the same sessions at the same offered load (per node, so it scales with the
cluster). Reuse is measured against an ideal shared cache: the longest prefix of a prompt that
any earlier prompt had.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

from bench import cores
from bench.agent.metrics import percentile
from bench.agent.workload import AgentWorkload
from bench.agent.mooncake import TraceRecord
from bench.simworkload import agent_sessions, reuse_ceiling, trace_sessions
from bench.workersim import Calibration, Call, Cluster, Placement, SimSession, Worker
from gateway.config import RouterConfig
from gateway.router import Route, Router
from kvstore.events import BlockRemoved, BlockStored, KVEventBatch
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.registry import NodeRegistry
from kvstore.valkey import EmbeddedValkey, connect

POLICIES = ("prefix_aware", "prefix_aware_full", "sticky", "round_robin", "random")
HEARTBEAT_S = 0.5  # each simulated node's heartbeat period, as a worker's (workers/publisher.py)
FILL_CHAIN = 512  # blocks per stored chain when filling the index to a size
FILL_EVENTS_PER_BATCH = 32
SERVER_TIMED_LOOKUPS = 500  # lookups replayed alone to measure Redis's own time per lookup


# The agent workload the simulation plays by default (bench/simworkload.py turns it into calls): 12
# model calls per session (a few agent steps of several calls each), 1 s of tool time between calls.
SIMULATED_AGENT = AgentWorkload(sessions=0, turns=12, system_words=400, tools=6, task_words=24, tool_output_words=150,
                                user_words=12, max_tokens=16, think_time_s=1.0)  # fmt: skip


class Scale(msgspec.Struct, frozen=True, kw_only=True):
    """Offered load per node, so every cluster size is equally busy."""

    sessions_per_node: int = 16
    session_rate_per_node_s: float = 0.0625  # Poisson session arrivals per second, per node (one per 16 s)
    trace_requests_per_node: int = 16  # a trace is cut to this many requests per node ...
    trace_rate_per_node_s: float = 0.5  # ... and replayed at this many requests per second per node
    capacity_blocks: int = 2048  # each node's pool
    bytes_per_block: int = 737_280  # SmolLM2-135M, fp32, blocks of 16


class Pool:
    """A node's cache of block hashes, least recently used first. A prompt's chain is touched
    from its last block to its first, so a prefix outlives its extensions, as in a real pool."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def held(self, hashes: list[int]) -> int:
        return next((i for i, h in enumerate(hashes) if h not in self.blocks), len(hashes))

    def store(self, hashes: list[int]) -> tuple[int, list[int]]:
        """Cache `hashes` (one prompt's chain); returns (blocks it already held, evicted)."""
        held = self.held(hashes)
        for h in reversed(hashes):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        return held, evicted


class _SessionKey(NamedTuple):
    worker_key: str


class _SimTurn(NamedTuple):
    """What Router.choose reads of a gateway Turn."""

    prompt_ids: range  # only its length is read
    block_hashes: list[int]
    max_tokens: int
    affinity: str | None
    session: _SessionKey


class _TimedIndex:
    """The index as the Router calls it, timing each lookup (the decision's one Redis round trip)."""

    def __init__(self, index: BlockIndex, times: list[float]) -> None:
        self.index, self.times = index, times

    async def lookup_matches(self, block_hashes: list[int]):
        t0 = time.perf_counter()
        try:
            return await self.index.lookup_matches(block_hashes)
        finally:
            self.times.append(time.perf_counter() - t0)


@dataclass
class Policy:
    """One routing policy over the simulated nodes, their pools and (for prefix_aware*) the index."""

    name: str
    nodes: list[NodeRecord]
    cal: Calibration
    scale: Scale
    index: BlockIndex | None = None
    runner: asyncio.Runner | None = None
    config: RouterConfig = field(default_factory=RouterConfig)
    seed: int = 0
    pools: list[Pool] = field(init=False)
    decision_s: list[float] = field(default_factory=list)  # the whole decision: lookup, candidates, cost function
    lookup_s: list[float] = field(default_factory=list)  # of which the index lookup (one Redis round trip)
    moved_blocks: int = 0
    last_node: dict[str, int] = field(default_factory=dict)
    now: float = 0.0  # simulated time of the event being handled
    prompts: list[list[int]] = field(default_factory=list)  # the first calls' block hashes (to time the lookup alone)

    def __post_init__(self) -> None:
        self.pools = [Pool(self.scale.capacity_blocks) for _ in self.nodes]
        # Every node heartbeats its load every HEARTBEAT_S of simulated time, phases spread, as workers
        # do: LIVE changes as often as in a real cluster, and lookups bring those changes back.
        self.beats = [(i * HEARTBEAT_S / len(self.nodes), i) for i in range(len(self.nodes))]
        self.rng = np.random.default_rng(self.seed)
        self.turns = itertools.count()
        self.position = {r.node_id: i for i, r in enumerate(self.nodes)}
        # prefix_aware*: the gateway's Router itself, on simulated time. It sees the nodes' loads as a
        # gateway does (their last heartbeat, corrected by its own turns in flight) and its snapshot,
        # used only if a lookup fails, is every node with no load.
        self.router = Router(_TimedIndex(self.index, self.lookup_s), lambda: [(r, NodeLoad()) for r in self.nodes],
                             self.config, clock=lambda: self.now) if self.index is not None else None  # fmt: skip
        self.routes: dict[str, Route] = {}  # session -> the route of its call in flight

    def place(self, session: SimSession, call: Call, workers: list[Worker], now: float) -> Placement:
        self.now = now
        if self.index is not None:
            self.runner.run(self._heartbeat(workers, now))
        prefill, decode = self._choose(session, call, workers)
        self.last_node[session.id] = decode
        bs = self.cal.block_size
        held_p, held_d = self.pools[prefill].held(call.block_hashes), self.pools[decode].held(call.block_hashes)
        new_tokens = call.prompt_tokens - min(held_p * bs, call.prompt_tokens - 1)
        moved = 0
        if prefill != decode:
            full = -(-call.prompt_tokens // bs)
            moved = full if self.name == "prefix_aware_full" else full - held_d
            self.moved_blocks += moved
            self._store(prefill, call.block_hashes)
        self._store(decode, call.block_hashes)
        return Placement(prefill, decode, new_tokens, moved)

    def finished(self, session: SimSession, now: float) -> None:
        if (route := self.routes.pop(session.id, None)) is not None:
            self.now = now
            self.router.loads.finished(route, session.id)

    def _choose(self, session: SimSession, call: Call, workers: list[Worker]) -> tuple[int, int]:
        n = len(self.nodes)
        if self.name.startswith("prefix_aware"):
            return self.runner.run(self._decide(session, call, workers))
        t0 = time.perf_counter()
        if self.name == "random":
            d = int(self.rng.integers(0, n))
        elif self.name == "round_robin":
            d = next(self.turns) % n
        else:  # sticky
            d = self.last_node[session.id] if session.id in self.last_node else next(self.turns) % n
        self.decision_s.append(time.perf_counter() - t0)
        return d, d

    async def _decide(self, session: SimSession, call: Call, workers: list[Worker]) -> tuple[int, int]:
        """The gateway's decision, `Router.choose` itself, timed inside the event loop as the gateway
        runs it: the index lookup, one candidate per node with its load, the cost function."""
        if len(self.prompts) < SERVER_TIMED_LOOKUPS:
            self.prompts.append(call.block_hashes)
        affinity = self.nodes[self.last_node[session.id]].node_id if session.id in self.last_node else None
        turn = _SimTurn(range(call.prompt_tokens), call.block_hashes, call.output_tokens, affinity, _SessionKey(session.id))
        t0 = time.perf_counter()
        route = await self.router.choose(turn)
        self.decision_s.append(time.perf_counter() - t0)
        self.router.loads.started(route, session.id)
        self.routes[session.id] = route
        d = self.position[route.decode.node_id]
        return (self.position[route.prefill.node_id] if route.prefill else d), d

    async def _heartbeat(self, workers: list[Worker], now: float) -> None:
        """The heartbeats due by `now` (untimed: workers send them, not the gateway)."""
        registry, capacity = self.index.registry, self.scale.capacity_blocks
        while self.beats[0][0] <= now:
            due, i = self.beats[0]
            w, record = workers[i], self.nodes[i]
            load = NodeLoad(running=len(w.running) + len(w.joining), waiting=w.waiting,
                            free_blocks=capacity - len(self.pools[i].blocks), total_blocks=capacity)  # fmt: skip
            await registry.heartbeat(record.node_id, record.generation, load, ttl_s=3600)
            heapq.heapreplace(self.beats, (due + HEARTBEAT_S * (1 + (now - due) // HEARTBEAT_S), i))  # none owed for a lull

    def _store(self, node: int, hashes: list[int]) -> None:
        held, evicted = self.pools[node].store(hashes)
        if self.index is None or (held == len(hashes) and not evicted):
            return
        events = [BlockStored(hashes[held:], hashes[held - 1] if held else None)] if held < len(hashes) else []
        events += [BlockRemoved(evicted)] if evicted else []
        record = self.nodes[node]
        self.runner.run(self.index.apply(KVEventBatch(record.node_id, record.generation, events)))


def run(nodes: tuple[int, ...] = (4, 16, 64, 256), *, policies: tuple[str, ...] = POLICIES, workload: AgentWorkload | None = None,
        trace: list[TraceRecord] | None = None, scale: Scale = Scale(), cal: Calibration = Calibration(), router: RouterConfig = RouterConfig(), fill_blocks: int = 0,
        share_core: bool = True, out_dir: str | Path | None = None, log=lambda _: None) -> dict[str, Any]:  # fmt: skip
    """Every policy at every cluster size on one private Valkey, on the agent workload or a Mooncake
    trace; `fill_blocks`: first fill the prefix_aware index to this many entries at the largest size
    (the router's decision latency with a production-sized index); `share_core`: Valkey runs on the
    simulator's core (bench/cores.py: what a second, idle vCPU adds is measured and reported apart)."""
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; choose from {list(POLICIES)}")
    w = workload or SIMULATED_AGENT
    results: dict[str, dict[str, Any]] = {p: {} for p in policies}
    with EmbeddedValkey() as valkey, asyncio.Runner() as runner:
        redis = runner.run(connect(valkey.url, timeout_s=120.0))
        try:
            round_trips = runner.run(cores.round_trips(redis, valkey.pid))
            with cores.sharing_a_core(valkey.pid, share_core) as core:
                for n in nodes:
                    sessions = _sessions(w, trace, n, scale, cal.block_size)
                    ceiling = reuse_ceiling(sessions, cal.block_size)
                    for name in policies:
                        namespace = f"sim{n}{name}"
                        index, records = runner.run(_register(redis, namespace, n, cal, scale))
                        uses_index = name.startswith("prefix_aware")
                        before, filled = runner.run(_used_memory(redis)), 0
                        if uses_index and fill_blocks and n == max(nodes) and name == "prefix_aware":
                            log(f"filling the index to {fill_blocks:,} blocks over {n} nodes")
                            filled = runner.run(_fill(index, records, fill_blocks))
                        policy = Policy(name, records, cal, scale, index if uses_index else None, runner, router)
                        cluster = Cluster(n, cal, policy)
                        outcomes = cluster.run(sessions)
                        indexed = sum(runner.run(index.sizes()).values()) if uses_index else 0
                        used = runner.run(_used_memory(redis)) - before
                        results[name][str(n)] = _summary(outcomes, ceiling, cluster, policy, scale, indexed, filled, used)
                        if uses_index:
                            results[name][str(n)]["lookup_server_us"] = runner.run(_lookup_server_us(redis, index, policy.prompts))
                        log(f"{name} at {n} nodes: ttft p90 {results[name][str(n)]['ttft_p90_s']:.3f} s, "
                            f"reuse {results[name][str(n)]['reuse_of_ceiling']:.3f}")  # fmt: skip
                        runner.run(_drop(redis, namespace))
        finally:
            runner.run(redis.aclose())
    result = {"bench": "simulate", "nodes": list(nodes), "scale": msgspec.to_builtins(scale),
              "workload": "mooncake trace" if trace is not None else msgspec.to_builtins(w),
              "calibration": msgspec.to_builtins(cal), "router": msgspec.to_builtins(router), "policies": results,
              "valkey": {"on_the_simulators_core": core is not None, "round_trip_after_busy": round_trips}}  # fmt: skip
    result["targets"] = targets(result)
    if out_dir is not None:
        result["plot"] = plot(result, Path(out_dir))
    return result


def _sessions(w: AgentWorkload, trace: list[TraceRecord] | None, n: int, scale: Scale, block_size: int) -> list[SimSession]:
    """The same offered load per node at every size: sessions (or trace requests) and their rate scale with `n`."""
    if trace is None:
        return agent_sessions(w, scale.sessions_per_node * n, scale.session_rate_per_node_s * n, block_size)
    ordered = sorted(r.timestamp for r in trace)
    span_s = (ordered[-1] - ordered[0]) / 1000 or 1.0
    time_scale = (len(ordered) / span_s) / (scale.trace_rate_per_node_s * n)
    return trace_sessions(trace, block_size, time_scale=time_scale, max_requests=scale.trace_requests_per_node * n)


def _summary(outcomes, ceiling, cluster: Cluster, policy: Policy, scale: Scale, indexed: int, filled: int, used: int) -> dict[str, Any]:
    ttft = [o.ttft_s for o in outcomes]
    reused = sum(o.cached_tokens for o in outcomes)
    busy = [w.busy_s for w in cluster.nodes]
    decision_ms = [s * 1000 for s in policy.decision_s]
    lookup_ms = [s * 1000 for s in policy.lookup_s]
    return {
        "requests": len(outcomes),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "reuse_of_ceiling": reused / max(1, sum(ceiling.values())),
        "load_imbalance": max(busy) / max(1e-9, float(np.mean(busy))),
        "utilisation": float(np.mean(busy)) / max(1e-9, max(o.sent_s + o.e2e_s for o in outcomes) - min(o.sent_s for o in outcomes)),
        "bytes_moved": policy.moved_blocks * scale.bytes_per_block,
        "decision_p50_ms": percentile(decision_ms, 50),
        "decision_p99_ms": percentile(decision_ms, 99),
        "lookup_p50_ms": percentile(lookup_ms, 50),
        "lookup_p99_ms": percentile(lookup_ms, 99),
        "indexed_blocks": indexed,
        "filled_blocks": filled,
        "redis_bytes_per_block": used / indexed if indexed else None,
    }


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 16's: at the largest size, prefix_aware captures >= 0.95 of the ceiling, its TTFT p90 is
    >= 10x lower than random's, and a decision takes <= 2 ms at p99 (with >= 10 M blocks indexed)."""
    top = str(max(result["nodes"]))
    pa = result["policies"].get("prefix_aware", {}).get(top, {})
    rnd = result["policies"].get("random", {}).get(top, {})
    ratio = rnd["ttft_p90_s"] / pa["ttft_p90_s"] if pa and rnd and pa["ttft_p90_s"] else None
    checks = {
        "prefix_aware_reuse_of_ceiling": (pa.get("reuse_of_ceiling"), ">= 0.95", lambda v: v >= 0.95),
        "random_ttft_p90_over_prefix_aware": (ratio, ">= 10", lambda v: v >= 10),
        "prefix_aware_decision_p99_ms": (pa.get("decision_p99_ms"), "<= 2 (with >= 10 M blocks indexed)",
                                         lambda v: v <= 2 and pa.get("indexed_blocks", 0) >= 10_000_000),
    }  # fmt: skip
    return {name: {"value": v, "target": t, "met": None if v is None else bool(ok(v))} for name, (v, t, ok) in checks.items()}


async def _register(redis, namespace: str, n: int, cal: Calibration, scale: Scale) -> tuple[BlockIndex, list[NodeRecord]]:
    registry = NodeRegistry(redis, namespace)
    records = []
    for i in range(n):
        node_id = f"sim{i}"
        record = NodeRecord(node_id, Role.BOTH, f"http://sim{i}", cal.block_size, "simulate", scale.capacity_blocks,
                            await registry.next_generation(node_id))  # fmt: skip
        await registry.register(record, ttl_s=3600)
        records.append(record)
    return BlockIndex(redis, namespace, registry), records


async def _fill(index: BlockIndex, records: list[NodeRecord], blocks: int) -> int:
    """Random chains (never matching the workload) spread over the nodes, applied batch by batch."""
    rng = np.random.default_rng(1)
    per_node = blocks // len(records)
    for record in records:
        for start in range(0, per_node, FILL_CHAIN * FILL_EVENTS_PER_BATCH):
            size = min(FILL_CHAIN * FILL_EVENTS_PER_BATCH, per_node - start)
            hashes = rng.integers(0, 2**64, size, dtype=np.uint64, endpoint=False).tolist()
            events = [BlockStored(hashes[s : s + FILL_CHAIN]) for s in range(0, size, FILL_CHAIN)]
            await index.apply(KVEventBatch(record.node_id, record.generation, events))
    return per_node * len(records)


async def _lookup_server_us(redis, index: BlockIndex, prompts: list[list[int]]) -> float | None:
    """Redis's own time per lookup (the script, no round trip), the workload's prompts replayed alone:
    1e6 / it is how many routing decisions per second one primary serves (docs/scale-out.md)."""
    if not prompts:
        return None
    await redis.config_resetstat()
    for prompt in prompts:
        await index.lookup(prompt)
    stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
    return float(stats.get("usec_per_call", 0.0)) or None


async def _used_memory(redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def _drop(redis, namespace: str) -> None:
    """Unlink the namespace's keys (10 M holder sets after a fill: in batches, not one call per key)."""
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{{{namespace}}}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 5_000:
            await redis.unlink(*batch)
            batch = []
    if batch:
        await redis.unlink(*batch)


def plot(result: dict[str, Any], out_dir: Path) -> str:
    """TTFT p90 and reuse of the ceiling against node count, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_n in result["policies"].items():
        ns = [int(n) for n in by_n]
        left.plot(ns, [by_n[str(n)]["ttft_p90_s"] for n in ns], marker="o", label=name)
        right.plot(ns, [by_n[str(n)]["reuse_of_ceiling"] for n in ns], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="nodes", ylabel="TTFT p90 (s)", title="TTFT p90 vs nodes")
    right.set(xscale="log", xlabel="nodes", ylabel="reused / ideal", ylim=(0, 1.05), title="Reuse captured vs nodes")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "simulate.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
