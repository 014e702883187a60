"""The router: where a turn runs, so that as little as possible is recomputed or moved.

Cost function (units: prompt tokens; weights in gateway.config.RouterConfig; docs/gateway.md):

    miss(n)    = prompt_tokens - cached_tokens(n)            tokens node n lacks
    busy(n)    = load_tokens * (running(n) + waiting(n)      + full_penalty if n lacks free blocks
                 + idle_session_weight * idle_sessions(n))   (sessions between calls whose last turn ran on n)
    prefill(p) = miss(p) + load_tokens * queued(p)           + full_penalty: what p's prefill waits for
                                                             and computes; queued = waiting on a node that
                                                             decodes (its decodes barely delay it), running +
                                                             waiting on a prefill-only one (all prefills)
    S          = the prefill-capable node holding the longest prefix (waiting(S) <= max_prefill_queue)
    obtain(n)  = min(miss(n), prefill(S) + transfer_tokens_per_block * blocks n lacks + handover(n))  if S holds more
                 than n and miss(n) > prefill_threshold_tokens, else miss(n): n computes what it lacks,
                 or S computes the rest and n pulls it (nothing cached anywhere is recomputed)
    decode(n)  = obtain(n) + busy(n) - affinity_tokens * [n served the session's last turn]
    D          = argmin decode(n) over decode-capable nodes  (ties: the first node id after the last
                                                              decision's D, wrapping around)
    P          = argmin prefill(p) over prefill-capable p != D with waiting(p) <= max_prefill_queue
                 and miss(p) <= miss(D) + block_size  (P never recomputes what D already holds),
                 or p reads D's prefix: p is prefill-only, p and D declare "kv_readback", and D holds
                 >= readback_min_tokens more of the prompt than p; then prefill(p) = miss(D) +
                 readback_tokens + load_tokens * queued(p)  (vLLM's bidirectional transfer: D's hold
                 and p's read each wait for an engine step)
    handover(n)= what n's engine makes a first token wait to take over a prefill (NodeRecord.handover_tokens:
                 0 for the built-in engine, engine steps for vLLM's connector)
    use P  iff  miss(D) > prefill_threshold_tokens  and  prefill(P) + handover(D) <= worth(P) * miss(D)
                 worth(P) = prefill_worth for a prefill-only P; both_prefill_worth for a `both` one (it
                 stalls its own decodes for the prefill)

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
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
from redis.exceptions import RedisError

from gateway.candidates import Candidate, Candidates
from gateway.config import RouterConfig
from gateway.errors import ClusterMisconfigured, NoWorkers
from kvstore.index import BlockIndex, LiveRows, Matches
from kvstore.nodes import NodeRecord

if TYPE_CHECKING:  # routing reads a turn's block_hashes, prompt_ids, affinity and max_tokens
    from gateway.turn import Turn

log = logging.getLogger("agentkv.gateway")

FULL_PENALTY_SEQS = 4  # a node without room for the request costs like 4 more queued sequences


class RouteMode(str, Enum):
    EXACT = "exact"
    DEGRADED = "degraded"


@dataclass
class Route:
    mode: RouteMode
    decode: NodeRecord
    prefill: NodeRecord | None
    prompt_tokens: int
    block_size: int
    decode_cached_tokens: int  # what the index says D holds of the prompt
    prefill_cached_tokens: int = 0
    readback: bool = False  # P reads D's cached prefix from D first (both declare "kv_readback")

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
    candidates: Candidates | list[Candidate],
    prompt_tokens: int,
    max_tokens: int,
    config: RouterConfig,
    *,
    mode: RouteMode = RouteMode.EXACT,
    affinity: str | None = None,
    after: str | None = None,
) -> Route:
    """The cost function itself: pure, so it is tested without Redis or workers. Every node is
    priced at once, an array operation per term of the formula above.

    Equal costs go to the first node id after `after` (wrapping around). The Router passes the last
    decision's decode node, so nodes that look alike take turns: otherwise every new session lands
    on the lowest id among the idle-looking nodes (those whose sessions are between calls), and
    `agentkv bench simulate` measured 1.7-2.2x load imbalance and twice sticky routing's TTFT p90."""
    c = candidates if isinstance(candidates, Candidates) else Candidates.of(candidates)
    if not len(c):
        raise NoWorkers("no worker is registered: start one with `agentkv worker` (or use `agentkv up`)")
    _check_compatible(c)
    bs, lt = c.record(0).block_size, config.load_tokens
    cached = np.minimum(c.cached_blocks * bs, prompt_tokens)
    miss = prompt_tokens - cached
    reports_room = c.total_blocks > 0  # a node without total_blocks is never full
    full_decode = reports_room & (c.free_blocks < -(-(miss + max_tokens) // bs))
    full_prefill = reports_room & (c.free_blocks < -(-miss // bs))
    busy = lt * (c.seqs + config.idle_session_weight * c.idle) + np.where(full_decode, lt * FULL_PENALTY_SEQS, 0.0)
    # What p's prefill queues behind: its waiting prefills; on a prefill-only node, all it runs (prefills)
    # and this gateway's turns in flight there, which its report (up to a heartbeat old) may lack yet.
    queued = np.where(c.decode_capable, c.waiting, c.seqs)
    prefill = miss + lt * (queued + FULL_PENALTY_SEQS * full_prefill)

    sources = c.prefill_capable & (c.waiting <= config.max_prefill_queue)
    source_cached, source_cost = -1, 0.0  # S: the longest prefix, then the cheapest prefill
    if sources.any():
        source_cached = cached[sources].max()
        source_cost = prefill[sources & (cached == source_cached)].min()
    prompt_blocks = -(-prompt_tokens // bs)
    pulled = np.minimum(miss, source_cost + config.transfer_tokens_per_block * (prompt_blocks - cached // bs) + c.handover_tokens)
    obtain = np.where((source_cached <= cached) | (miss <= config.prefill_threshold_tokens), miss, pulled)
    decode = obtain + busy
    if (a := c.index_of(affinity)) >= 0:
        decode[a] -= config.affinity_tokens

    rank = c.tie_rank(after)
    d = _cheapest(decode, rank, _decoders(c))
    d_miss = int(miss[d])
    route = Route(mode, c.record(d), None, prompt_tokens, bs, int(cached[d]))
    if d_miss <= config.prefill_threshold_tokens:
        return route
    readers = _readers(c, d, sources, cached, config.readback_min_tokens)
    # A reader lacks only what D lacks; the hold and the read add a fixed cost, so only a long prefill
    # is worth handing over this way.
    read = d_miss + config.readback_tokens + lt * (queued + FULL_PENALTY_SEQS * full_prefill)
    prefill = np.where(readers, read, prefill)
    prefillers = sources & (readers | (miss <= d_miss + bs))  # P never recomputes what D already holds
    prefillers[d] = False
    if prefillers.any():
        p = _cheapest(prefill, rank, prefillers)
        worth = config.both_prefill_worth if c.decode_capable[p] else config.prefill_worth
        if prefill[p] + c.handover_tokens[d] <= worth * d_miss:
            route.prefill, route.prefill_cached_tokens, route.readback = c.record(p), int(cached[p]), bool(readers[p])
    return route


def _readers(c: Candidates, d: int, sources: np.ndarray, cached: np.ndarray, min_tokens: int) -> np.ndarray:
    """Prefill-only candidates that would read at least `min_tokens` of D's cached prefix from D (P
    and D both declare "kv_readback"), so they lack only what D lacks. A `both` node is never one: it
    would stall its own decodes to compute a turn D could compute itself."""
    readers = sources & ~c.decode_capable & (cached[d] - cached >= max(min_tokens, 1))
    if readers.any() and "kv_readback" in c.record(d).features:
        at = np.flatnonzero(readers)
        readers[at] = ["kv_readback" in c.record(int(i)).features for i in at]
        return readers
    return np.zeros(len(c), dtype=bool)


def _cheapest(cost: np.ndarray, rank: np.ndarray, eligible: np.ndarray) -> int:
    """argmin of (cost, tie rank) over the eligible candidates."""
    at = np.flatnonzero(eligible)
    costs = cost[at]
    tied = at[costs == costs.min()]
    return int(tied[np.argmin(rank[tied])])


def _check_compatible(c: Candidates) -> None:
    if len(c.table.kinds) > 1:  # the table mixes block sizes or models: do the candidates?
        check_compatible([c.record(i) for i in range(len(c))])


def _decoders(c: Candidates) -> np.ndarray:
    """Decode-capable nodes; while none is live (a decode worker restarting), the prefill nodes decode
    too, prefilling locally: every worker serves both calls, roles only steer the router."""
    if c.decode_capable.any():
        return c.decode_capable
    log.warning("no decode node is live: prefill nodes decode too until one is back")
    return np.ones(len(c), dtype=bool)


def choose_baseline(candidates: Candidates | list[Candidate], prompt_tokens: int, policy: str, turn: int, *,
                    mode: RouteMode = RouteMode.EXACT, affinity: str | None = None) -> Route:  # fmt: skip
    """The policies prefix-aware routing is measured against: `sticky` (the session's last node,
    else in turn) and `round_robin` (decode nodes in turn, by node id). The chosen node always
    prefills locally."""
    c = candidates if isinstance(candidates, Candidates) else Candidates.of(candidates)
    if not len(c):
        raise NoWorkers("no worker is registered: start one with `agentkv worker` (or use `agentkv up`)")
    _check_compatible(c)
    decoders = np.flatnonzero(_decoders(c))  # in node id order, like the rows
    a = c.index_of(affinity)
    d = a if policy == "sticky" and a in decoders else int(decoders[turn % len(decoders)])
    bs = c.record(d).block_size
    return Route(mode, c.record(d), None, prompt_tokens, bs, min(int(c.cached_blocks[d]) * bs, prompt_tokens))


class LoadTracker:
    """This gateway's own turns per node, to correct the nodes' reported loads, which lag by up to
    one heartbeat (gateway.candidates.Candidates.from_matches): its turns in flight, those ended
    within a report's possible age, and its sessions between calls, per node of their last turn.
    Call `started` when a route is taken and `finished` when its turn ends.

    Counts live in numpy columns, a slot per node id ever seen (slot 0 stays empty, for ids never
    seen), so a decision reads them for every node with one gather (`columns`) instead of a dict
    lookup per node."""

    def __init__(self, report_age_s: float, clock=time.monotonic, session_idle_s: float = 60.0) -> None:
        self.report_age_s = report_age_s
        self.clock = clock
        self.session_idle_s = session_idle_s
        self._slots: dict[str, int] = {}
        self._flying = np.zeros(16, dtype=np.int64)  # turns in flight
        self._ended = np.zeros(16, dtype=np.int64)  # turns released within report_age_s (entries of _ends)
        self._idle = np.zeros(16, dtype=np.int64)  # idle sessions (entries of _homes)
        self._ends: deque[tuple[float, int]] = deque()  # (when, slot) of each release, oldest first
        self._homes: OrderedDict[str, tuple[int, float]] = OrderedDict()  # idle session -> (slot, ended at), oldest first
        self._gather: tuple[object, int, np.ndarray] | None = None  # (rows, slots known, each row's slot)

    @property
    def in_flight(self) -> dict[str, int]:
        """node id -> this gateway's turns in flight there, for every node it has routed to."""
        return {node_id: int(self._flying[slot]) for node_id, slot in self._slots.items()}

    def started(self, route: Route, session: str | None = None) -> None:
        for record in route.nodes():
            slot = self._slot(record.node_id)  # first: a new slot may grow the columns
            self._flying[slot] += 1
        self._leave(session)

    def finished(self, route: Route, session: str | None = None, released: frozenset[str] = frozenset()) -> None:
        """The turn ended; `released`: its nodes already let go with `release`."""
        for record in route.nodes():
            if record.node_id not in released:
                self.release(record.node_id)
        if session is not None:
            self._leave(session)
            slot = self._slot(route.decode.node_id)
            self._homes[session] = (slot, self.clock())
            self._idle[slot] += 1

    def release(self, node_id: str) -> None:
        """One node's part of a turn in flight is over (a prefill node's, once D has the prompt)."""
        slot = self._slot(node_id)
        self._flying[slot] -= 1
        self._ends.append((self.clock(), slot))
        self._ended[slot] += 1

    def idle(self, excluding: str | None = None) -> dict[str, int]:
        """node id -> sessions whose last turn (through this gateway) ran there, ended within
        session_idle_s, and that have no turn in flight, but `excluding` (the session being routed)."""
        self._expire()
        own = self._homes[excluding][0] if excluding in self._homes else 0
        return {node_id: int(self._idle[slot]) - (slot == own) for node_id, slot in self._slots.items()}

    def columns(self, rows: LiveRows, session: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Turns in flight, turns ended within report_age_s and idle sessions (but `session`'s) on
        each node of `rows`, in row order."""
        self._expire()
        if self._gather is None or self._gather[0] is not rows or self._gather[1] != len(self._slots):
            self._gather = (rows, len(self._slots), np.array([self._slots.get(node_id, 0) for node_id in rows.ids], dtype=np.intp))
        slots = self._gather[2]
        idle = self._idle[slots]
        if session in self._homes:
            idle[slots == self._homes[session][0]] -= 1
        return self._flying[slots], self._ended[slots], idle

    def _slot(self, node_id: str) -> int:
        slot = self._slots.get(node_id)
        if slot is None:
            slot = self._slots[node_id] = len(self._slots) + 1
            if slot >= len(self._flying):
                self._flying, self._ended, self._idle = (_grown(a, 2 * slot) for a in (self._flying, self._ended, self._idle))
        return slot

    def _expire(self) -> None:
        now = self.clock()
        horizon = now - self.report_age_s
        while self._ends and self._ends[0][0] < horizon:
            self._ended[self._ends.popleft()[1]] -= 1
        horizon = now - self.session_idle_s
        while self._homes and next(iter(self._homes.values()))[1] < horizon:
            self._idle[self._homes.popitem(last=False)[1][0]] -= 1

    def _leave(self, session: str | None) -> None:
        if session is not None and (home := self._homes.pop(session, None)) is not None:
            self._idle[home[0]] -= 1


def _grown(column: np.ndarray, size: int) -> np.ndarray:
    grown = np.zeros(size, dtype=column.dtype)
    grown[: len(column)] = column
    return grown


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
        found: Matches | None = None
        try:
            async with asyncio.timeout(self.config.index_timeout_s):  # no task per call, unlike wait_for
                found = await self.index.lookup_matches(turn.block_hashes)
            mode = RouteMode.EXACT
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("block index unavailable (%s): routing DEGRADED on load and affinity", str(exc) or type(exc).__name__)
        if found is None or not found.usable.any():  # index down, or emptied by a Redis restart until the workers re-register
            found, mode = Matches.of((rec, load, 0) for rec, load in self.snapshot()), RouteMode.DEGRADED
        flying, ended, idle = self.loads.columns(found.rows, turn.session.worker_key if turn.session else None)
        candidates = Candidates.from_matches(found, exclude=exclude, flying=flying, ended=ended, idle=idle)
        if self.config.policy != "prefix":
            return choose_baseline(candidates, prompt_tokens, self.config.policy, next(self._turns), mode=mode, affinity=affinity)
        route = choose_route(candidates, prompt_tokens, turn.max_tokens, self.config, mode=mode, affinity=affinity,
                             after=self._last_decode)  # fmt: skip
        self._last_decode = route.decode.node_id
        return route
