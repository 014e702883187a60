"""The router: where a turn runs, so that as little as possible is recomputed or moved.

Cost function (units: prompt tokens; weights in gateway.config.RouterConfig; docs/gateway.md):

    miss(n)    = prompt_tokens - cached_tokens(n)            tokens node n lacks
    busy(n)    = load_tokens * (running(n) + waiting(n)      + full_penalty if n lacks free blocks
                 + idle_session_weight * idle_sessions(n))   (sessions between calls whose last turn ran on n)
    prefill(p) = miss(p) + load_tokens * waiting(p)          + full_penalty: what p's prefill waits for
                                                             and computes (its decodes barely delay it)
    S          = the prefill-capable node holding the longest prefix (waiting(S) <= max_prefill_queue)
    obtain(n)  = min(miss(n), prefill(S) + transfer_tokens_per_block * blocks n lacks)  if S holds more
                 than n and miss(n) > prefill_threshold_tokens, else miss(n): n computes what it lacks,
                 or S computes the rest and n pulls it (nothing cached anywhere is recomputed)
    decode(n)  = obtain(n) + busy(n) - affinity_tokens * [n served the session's last turn]
    D          = argmin decode(n) over decode-capable nodes  (ties: the first node id after the last
                                                              decision's D, wrapping around)
    P          = argmin prefill(p) over prefill-capable p != D with waiting(p) <= max_prefill_queue
                 and miss(p) <= miss(D) + block_size  (P never recomputes what D already holds)
    use P  iff  miss(D) > prefill_threshold_tokens  and  prefill(P) <= prefill_worth * miss(D)

Without `obtain`, a prefix cached on a few nodes (a shared system prompt, early on) pulls every new
session onto them until their load outweighs the whole prefix, and sessions stay where they start:
`agentkv bench simulate` measured 2-3x load imbalance and a TTFT p90 worse than random routing at
64 nodes (docs/gateway.md#router).

running/waiting are the node's report corrected by this gateway's own turns (`LoadTracker`), so
turns that arrive together do not all herd onto one stale snapshot. Mode EXACT: the index answered;
DEGRADED: it failed, was slow or knew no live node (a restarted Redis, before the workers
re-register): the cluster's last snapshot is routed on, every cached_tokens is 0 and load and
affinity decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import RedisError

from gateway.config import RouterConfig
from gateway.errors import ClusterMisconfigured, NoWorkers
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord, Role

if TYPE_CHECKING:  # routing reads a turn's block_hashes, prompt_ids, affinity and max_tokens
    from gateway.turn import Turn

log = logging.getLogger("agentkv.gateway")

FULL_PENALTY_SEQS = 4  # a node without room for the request costs like 4 more queued sequences


class RouteMode(str, Enum):
    EXACT = "exact"
    DEGRADED = "degraded"


class Candidate(msgspec.Struct, frozen=True, gc=False):
    """A node as one decision sees it. A Struct: a decision builds one per node (256 frozen
    dataclasses took 250 us to build here, these 31 us). Untracked by the garbage collector (it
    cannot be part of a cycle): 256 a decision otherwise bring its collections on sooner."""

    record: NodeRecord
    load: NodeLoad
    cached_blocks: int = 0
    idle_sessions: int = 0  # this gateway's sessions between calls whose last turn ran here (LoadTracker.idle)

    @property
    def node_id(self) -> str:
        return self.record.node_id


@dataclass
class Route:
    mode: RouteMode
    decode: NodeRecord
    prefill: NodeRecord | None
    prompt_tokens: int
    block_size: int
    decode_cached_tokens: int  # what the index says D holds of the prompt
    prefill_cached_tokens: int = 0

    @property
    def kind(self) -> str:
        return "disaggregated" if self.prefill else "local"

    @property
    def planned_transfer_blocks(self) -> int:
        """Blocks D is expected to pull from P: every prompt block it does not hold."""
        if self.prefill is None:
            return 0
        return -(-self.prompt_tokens // self.block_size) - self.decode_cached_tokens // self.block_size

    def nodes(self) -> list[NodeRecord]:
        return [n for n in (self.prefill, self.decode) if n is not None]


def check_compatible(records: list[NodeRecord]) -> None:
    """Refuse loudly when live nodes disagree: their hashes would never match each other's."""
    kinds = {(r.block_size, r.model_fingerprint) for r in records}
    if len(kinds) > 1:
        detail = ", ".join(f"{r.node_id}: block_size={r.block_size} model={r.model_fingerprint}" for r in records)
        log.error("live nodes disagree on block size or model; refusing to route: %s", detail)
        raise ClusterMisconfigured(
            f"the live workers disagree on block size or model ({detail}); run them all with the same model and --block-size"
        )


def choose_route(
    candidates: list[Candidate],
    prompt_tokens: int,
    max_tokens: int,
    config: RouterConfig,
    *,
    mode: RouteMode = RouteMode.EXACT,
    affinity: str | None = None,
    after: str | None = None,
) -> Route:
    """The cost function itself: pure, so it is tested without Redis or workers.

    Equal costs go to the first node id after `after` (wrapping around). The Router passes the last
    decision's decode node, so nodes that look alike take turns: otherwise every new session lands
    on the lowest id among the idle-looking nodes (those whose sessions are between calls), and
    `agentkv bench simulate` measured 1.7-2.2x load imbalance and twice sticky routing's TTFT p90."""
    if not candidates:
        raise NoWorkers("no worker is registered: start one with `agentkv worker` (or use `agentkv up`)")
    check_compatible([c.record for c in candidates])
    bs = candidates[0].record.block_size
    tie = _tie_order(after)
    candidates = _representatives(candidates, prompt_tokens, max_tokens, bs, affinity, tie)

    def cached(c: Candidate) -> int:
        return min(c.cached_blocks * bs, prompt_tokens)

    def busy(c: Candidate, need_tokens: int) -> float:
        cost = config.load_tokens * (c.load.running + c.load.waiting + config.idle_session_weight * c.idle_sessions)
        need_blocks = -(-need_tokens // bs)
        if c.load.total_blocks and c.load.free_blocks < need_blocks:
            cost += config.load_tokens * FULL_PENALTY_SEQS
        return cost

    def prefill_cost(c: Candidate) -> float:
        miss = prompt_tokens - cached(c)
        full = c.load.total_blocks and c.load.free_blocks < -(-miss // bs)
        return miss + config.load_tokens * (c.load.waiting + (FULL_PENALTY_SEQS if full else 0))

    sources = [c for c in candidates if c.record.role in (Role.PREFILL, Role.BOTH) and c.load.waiting <= config.max_prefill_queue]
    source = max(sources, key=lambda c: (cached(c), -prefill_cost(c)), default=None)

    source_cached = cached(source) if source is not None else -1
    source_cost = prefill_cost(source) if source is not None else 0.0
    prompt_blocks = -(-prompt_tokens // bs)

    def obtain(c: Candidate) -> float:
        held = cached(c)
        miss = prompt_tokens - held
        if source_cached <= held or miss <= config.prefill_threshold_tokens:
            return miss
        return min(miss, source_cost + config.transfer_tokens_per_block * (prompt_blocks - held // bs))

    def decode_cost(c: Candidate) -> float:
        miss = prompt_tokens - cached(c)
        return obtain(c) + busy(c, miss + max_tokens) - (config.affinity_tokens if c.node_id == affinity else 0.0)

    decoders = _decoders(candidates)
    d = min(decoders, key=lambda c: (decode_cost(c), tie(c.node_id)))
    d_miss = prompt_tokens - cached(d)
    route = Route(mode, d.record, None, prompt_tokens, bs, cached(d))
    if d_miss <= config.prefill_threshold_tokens:
        return route
    prefillers = [c for c in sources if c.node_id != d.node_id and prompt_tokens - cached(c) <= d_miss + bs]
    p = min(prefillers, key=lambda c: (prefill_cost(c), tie(c.node_id)), default=None)
    if p is not None and prefill_cost(p) <= config.prefill_worth * d_miss:
        route.prefill, route.prefill_cached_tokens = p.record, cached(p)
    return route


def _tie_order(after: str | None):
    """The key that orders node ids for ties: ids after `after` first, then the rest, each ascending."""
    if after is None:
        return lambda node_id: (False, node_id)
    return lambda node_id: (node_id <= after, node_id)


def _representatives(candidates: list[Candidate], prompt_tokens: int, max_tokens: int, bs: int,
                     affinity: str | None, tie=_tie_order(None)) -> list[Candidate]:  # fmt: skip
    """The first two node ids (in `tie` order) of each group of candidates that the cost function
    cannot tell apart: the same route as all of them, at a fraction of the cost (at 256 nodes most
    nodes hold the same few prefixes under the same few loads).

    Why it is exact: choose_route reads a node only through its cached_blocks, its role, running +
    waiting, waiting, its idle sessions, whether its free blocks cover what it lacks (+ max_tokens for
    decode; a node without total_blocks is never full), whether it is the affinity node, and its node
    id. Nodes equal in all but the id (one group) get identical costs and eligibilities, so
    - D = argmin (decode cost, tie(node id)): only a group's first id can win;
    - P = argmin (prefill cost, tie(node id)) over a group-wise filter, minus D: a group's first id,
      or its second when the first is D;
    - S (the source) is used only through its (cached, prefill cost), which every member shares,
      and each group keeps a member, so max over the groups' members is the same value;
    - the role is in the key, so the no-decoder fallback of _decoders sees the same roles.
    Node ids are unique (the registry is keyed by them), so no two tie keys are equal.
    tests/test_gateway_router.py holds this to the full evaluation (the code before the shortlist)
    on random clusters full of ties."""
    need_by_cached: dict[int, tuple[int, int]] = {}
    kept: dict[tuple, list[tuple[tuple, Candidate]]] = {}  # group -> its first two (tie key, candidate) so far, in order
    for c in candidates:
        needs = need_by_cached.get(c.cached_blocks)
        if needs is None:
            miss = prompt_tokens - min(c.cached_blocks * bs, prompt_tokens)
            needs = need_by_cached[c.cached_blocks] = (-(-(miss + max_tokens) // bs), -(-miss // bs))
        load = c.load
        full = (load.free_blocks < needs[0], load.free_blocks < needs[1]) if load.total_blocks else (False, False)
        record = c.record
        key = (c.cached_blocks, record.role, load.running + load.waiting, load.waiting, c.idle_sessions, full, record.node_id == affinity)
        t = tie(record.node_id)
        group = kept.get(key)
        if group is None:
            kept[key] = [(t, c)]
        elif len(group) == 1:
            group.insert(t > group[0][0], (t, c))
        elif t < group[1][0]:
            group[1] = (t, c)
            if t < group[0][0]:
                group.reverse()
    return [c for group in kept.values() for _, c in group]


def _decoders(candidates: list[Candidate]) -> list[Candidate]:
    """Decode-capable nodes; while none is live (a decode worker restarting), the prefill nodes decode
    too, prefilling locally: every worker serves both calls, roles only steer the router."""
    decoders = [c for c in candidates if c.record.role in (Role.DECODE, Role.BOTH)]
    if not decoders:
        log.warning("no decode node is live: prefill nodes decode too until one is back")
    return decoders or list(candidates)


def choose_baseline(candidates: list[Candidate], prompt_tokens: int, policy: str, turn: int, *,
                    mode: RouteMode = RouteMode.EXACT, affinity: str | None = None) -> Route:  # fmt: skip
    """The policies prefix-aware routing is measured against: `sticky` (the session's last node,
    else in turn) and `round_robin` (decode nodes in turn). The chosen node always prefills locally."""
    if not candidates:
        raise NoWorkers("no worker is registered: start one with `agentkv worker` (or use `agentkv up`)")
    decoders = sorted(_decoders(candidates), key=lambda c: c.node_id)
    check_compatible([c.record for c in candidates])
    by_id = {c.node_id: c for c in decoders}
    d = by_id[affinity] if policy == "sticky" and affinity in by_id else decoders[turn % len(decoders)]
    bs = d.record.block_size
    return Route(mode, d.record, None, prompt_tokens, bs, min(d.cached_blocks * bs, prompt_tokens))


class LoadTracker:
    """This gateway's own turns per node, to correct the nodes' reported loads, which lag by up to
    one heartbeat: a reported count includes turns that have finished since, and misses turns sent
    since; and its sessions between calls, per node of their last turn. Call `started` when a route
    is taken and `finished` when its turn ends."""

    def __init__(self, report_age_s: float, clock=time.monotonic, session_idle_s: float = 60.0) -> None:
        self.report_age_s = report_age_s
        self.clock = clock
        self.session_idle_s = session_idle_s
        self.in_flight: Counter[str] = Counter()
        self._finished: dict[str, deque[float]] = {}
        self._homes: OrderedDict[str, tuple[str, float]] = OrderedDict()  # idle session -> (node, ended at), oldest first
        self._idle: Counter[str] = Counter()  # node -> idle sessions in _homes

    def started(self, route: Route, session: str | None = None) -> None:
        for record in route.nodes():
            self.in_flight[record.node_id] += 1
        self._leave(session)

    def finished(self, route: Route, session: str | None = None, released: frozenset[str] = frozenset()) -> None:
        """The turn ended; `released`: its nodes already let go with `release`."""
        for record in route.nodes():
            if record.node_id not in released:
                self.release(record.node_id)
        now = self.clock()
        if session is not None:
            self._leave(session)
            self._homes[session] = (route.decode.node_id, now)
            self._idle[route.decode.node_id] += 1

    def release(self, node_id: str) -> None:
        """One node's part of a turn in flight is over (a prefill node's, once D has the prompt)."""
        self.in_flight[node_id] -= 1
        self._finished.setdefault(node_id, deque()).append(self.clock())

    def idle(self, excluding: str | None = None) -> Callable[[str], int]:
        """node id -> sessions whose last turn (through this gateway) ran there, ended within
        session_idle_s, and that have no turn in flight, but `excluding` (the session being routed)."""
        horizon = self.clock() - self.session_idle_s
        while self._homes and next(iter(self._homes.values()))[1] < horizon:
            self._idle[self._homes.popitem(last=False)[1][0]] -= 1
        own, counts = self._homes.get(excluding, ("",))[0] if excluding is not None else "", self._idle
        return lambda node_id: counts.get(node_id, 0) - (node_id == own)

    def _leave(self, session: str | None) -> None:
        if session is not None and (home := self._homes.pop(session, None)) is not None:
            self._idle[home[0]] -= 1

    def corrected(self, node_id: str, load: NodeLoad) -> NodeLoad:
        """`load` with running + waiting = max(own turns in flight, reported - own turns finished
        within the report's possible age). Other gateways' turns stay in the reported part."""
        done = self._finished.get(node_id)
        if not (done or self.in_flight.get(node_id)):
            return load  # nothing of ours there, the common case at hundreds of nodes
        horizon = self.clock() - self.report_age_s
        while done and done[0] < horizon:
            done.popleft()
        total = max(self.in_flight[node_id], load.running + load.waiting - len(done or ()))
        waiting = min(load.waiting, total)
        return msgspec.structs.replace(load, running=total - waiting, waiting=waiting)


class RouteLease:
    """A route held for one turn: its nodes count as busy (LoadTracker) until the lease ends, and
    the turn may move once, when its decode node turns out to be unreachable before any token."""

    def __init__(self, router: Router, turn: Turn, route: Route) -> None:
        self.router = router
        self.turn = turn
        self.route = route
        self.rerouted = False
        self.session = turn.session.worker_key if turn.session else None
        self.released: frozenset[str] = frozenset()  # nodes whose part of the turn is over

    def prefill_done(self) -> None:
        """P's part is over (D pulls the blocks or computes them): P stops counting the turn as load,
        so a prefill node is not priced busy while the turns it prefilled decode elsewhere."""
        if self.route.prefill is not None and self.route.prefill.node_id not in self.released:
            self.released |= {self.route.prefill.node_id}
            self.router.loads.release(self.route.prefill.node_id)

    async def reroute(self, unreachable_node: str) -> Route | None:
        """A new route without that node, or None if this lease already moved once."""
        if self.rerouted:
            return None
        self.rerouted = True
        self.router.loads.finished(self.route, released=self.released)
        self.released = frozenset()
        self.route = await self.router.choose(self.turn, exclude=frozenset({unreachable_node}))
        self.router.loads.started(self.route)
        return self.route


class Router:
    """Looks up the prompt's blocks in the index (or falls back to the node snapshot) and decides."""

    def __init__(self, index: BlockIndex, snapshot, config: RouterConfig, clock=time.monotonic) -> None:
        self.index = index
        self.snapshot = snapshot  # () -> list[(NodeRecord, NodeLoad)]: the cluster's last view
        self.config = config
        self.loads = LoadTracker(config.load_report_age_s, clock=clock, session_idle_s=config.session_idle_s)
        self._turns = itertools.count()  # round-robin position of the baseline policies
        self._last_decode: str | None = None  # ties go to the node ids after it (choose_route's `after`)

    @contextlib.asynccontextmanager
    async def lease(self, turn: Turn) -> AsyncIterator[RouteLease]:
        lease = RouteLease(self, turn, await self.choose(turn))
        self.loads.started(lease.route, lease.session)
        try:
            yield lease
        finally:
            self.loads.finished(lease.route, lease.session, lease.released)

    async def choose(self, turn: Turn, exclude: frozenset[str] = frozenset()) -> Route:
        prompt_tokens, affinity = len(turn.prompt_ids), turn.affinity
        found: list[tuple[NodeRecord, NodeLoad, int]] = []
        try:
            async with asyncio.timeout(self.config.index_timeout_s):  # no task per call, unlike wait_for
                found = await self.index.lookup_with_nodes(turn.block_hashes)
            mode = RouteMode.EXACT
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("block index unavailable (%s): routing DEGRADED on load and affinity", exc or type(exc).__name__)
        if not found:  # index down, or emptied by a Redis restart until the workers re-register
            found, mode = [(rec, load, 0) for rec, load in self.snapshot()], RouteMode.DEGRADED
        idle, corrected = self.loads.idle(turn.session.worker_key if turn.session else None), self.loads.corrected
        candidates = [Candidate(rec, corrected(rec.node_id, load), matched, idle(rec.node_id))
                      for rec, load, matched in found if rec.node_id not in exclude]  # fmt: skip
        if self.config.policy != "prefix":
            return choose_baseline(candidates, prompt_tokens, self.config.policy, next(self._turns), mode=mode, affinity=affinity)
        route = choose_route(candidates, prompt_tokens, turn.max_tokens, self.config, mode=mode, affinity=affinity,
                             after=self._last_decode)  # fmt: skip
        self._last_decode = route.decode.node_id
        return route
