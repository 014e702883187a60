"""The router's cost function (pure) and its EXACT/DEGRADED modes (with a fake index)."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config import RouterConfig, router_config
from gateway.candidates import Candidates
from gateway.errors import ClusterMisconfigured, NoWorkers
from gateway.router import FULL_PENALTY_SEQS, Candidate, LoadTracker, Route, RouteMode, Router, check_compatible, choose_route
from kvstore.index import Matches
from kvstore.nodes import NodeLoad, NodeRecord, Role

CFG = RouterConfig(prefill_threshold_tokens=64, load_tokens=128, affinity_tokens=256, prefill_worth=2.0, max_prefill_queue=8)


def node(node_id: str, role: Role = Role.DECODE, cached_blocks: int = 0, running: int = 0, waiting: int = 0,
         free: int = 1000, block_size: int = 16, fingerprint: str = "m", handover: float = 0.0) -> Candidate:  # fmt: skip
    rec = NodeRecord(node_id=node_id, role=role, address=f"http://{node_id}", block_size=block_size,
                     model_fingerprint=fingerprint, capacity_blocks=1000, generation=1, handover_tokens=handover)  # fmt: skip
    return Candidate(rec, NodeLoad(running=running, waiting=waiting, free_blocks=free, total_blocks=1000), cached_blocks)


def test_decode_node_holding_the_longest_prefix_wins():
    route = choose_route([node("d1", cached_blocks=2), node("d2", cached_blocks=30)], 500, 16, CFG)
    assert route.decode.node_id == "d2" and route.decode_cached_tokens == 480 and route.prefill is None


def test_a_much_busier_node_loses_its_cache_advantage():
    # d2 holds 64 more tokens than d1 but runs 3 more sequences (3 x 128 tokens of cost).
    route = choose_route([node("d1", cached_blocks=26), node("d2", cached_blocks=30, running=3)], 500, 16, CFG)
    assert route.decode.node_id == "d1"


def test_affinity_breaks_near_ties_but_does_not_pin():
    tie = [node("d1", cached_blocks=10), node("d2", cached_blocks=10)]
    assert choose_route(tie, 500, 16, CFG).decode.node_id == "d1"  # node id breaks exact ties ...
    assert choose_route(tie, 500, 16, CFG, after="d1").decode.node_id == "d2"  # ... taking turns past the last choice
    assert choose_route(tie, 500, 16, CFG, after="d2").decode.node_id == "d1"  # (wrapping around)
    assert choose_route(tie, 500, 16, CFG, affinity="d2").decode.node_id == "d2"
    far = [node("d1", cached_blocks=30), node("d2", cached_blocks=0)]  # 480 tokens > the 256 bonus
    assert choose_route(far, 500, 16, CFG, affinity="d2").decode.node_id == "d1"


def test_a_node_without_room_is_penalised():
    route = choose_route([node("d1", cached_blocks=4, free=3), node("d2", cached_blocks=0)], 100, 16, CFG)
    assert route.decode.node_id == "d2"


def test_prefill_node_takes_a_prompt_the_decode_node_lacks():
    route = choose_route([node("d1"), node("p1", Role.PREFILL)], 500, 16, CFG)
    assert route.kind == "disaggregated" and route.prefill.node_id == "p1"
    assert route.planned_transfer_blocks == 32  # ceil(500 / 16): D holds nothing


def test_decode_node_prefills_locally_below_the_threshold():
    route = choose_route([node("d1", cached_blocks=28), node("p1", Role.PREFILL)], 500, 16, CFG)  # lacks 52
    assert route.prefill is None and route.kind == "local"


def test_prefill_node_never_recomputes_more_than_the_decode_node_lacks():
    # D lacks 180 tokens; the only prefill node lacks all 500: D prefills its 180 itself.
    route = choose_route([node("d1", Role.BOTH, cached_blocks=20), node("p1", Role.BOTH)], 500, 16, CFG)
    assert route.decode.node_id == "d1" and route.prefill is None


def test_a_prefill_node_that_can_read_the_decode_nodes_prefix_lacks_only_what_d_lacks():
    """vLLM workers declare "kv_readback": P reads what D holds beyond P's own cache instead of
    recomputing it, so P is priced by what D lacks plus the read's fixed cost; without the feature,
    for a gain under readback_min_tokens, or for a short prefill, P stays out."""
    def pair(features, p_cached=5):
        d, p = node("d1", cached_blocks=20), node("p1", Role.PREFILL, cached_blocks=p_cached)
        return [msgspec.structs.replace(c, record=msgspec.structs.replace(c.record, features=features)) for c in (d, p)]

    route = choose_route(pair(["kv_readback"]), 800, 16, CFG)  # D lacks 480, P 720 of which D holds 240
    assert route.prefill.node_id == "p1" and route.readback and route.decode_cached_tokens == 320
    assert CFG.readback_tokens == 256  # D lacking 180: 180 + 256 > 2 x 180, the hold and the read cost more
    assert choose_route(pair(["kv_readback"]), 500, 16, CFG).prefill is None
    assert choose_route(pair([]), 800, 16, CFG).prefill is None
    assert choose_route(pair(["kv_readback"], p_cached=17), 800, 16, CFG).prefill is None  # D holds 48 more: under 64
    near = choose_route(pair(["kv_readback"], p_cached=19), 800, 16, CFG)  # a block more: P recomputes it, as without
    assert near.prefill.node_id == "p1" and not near.readback


def test_a_prefill_only_node_is_priced_by_every_prefill_it_runs_or_was_sent():
    """A prefill-only node's running sequences are prefills its next turn queues behind, and so are this
    gateway's turns in flight there (its report lags): a burst does not herd onto it. A `both` node's
    running sequences are decodes, which barely delay a prefill."""
    # D lacks 100: P is used iff its cost <= 2 x 100
    assert choose_route([node("d1"), node("p1", Role.PREFILL)], 100, 16, CFG).prefill.node_id == "p1"
    assert choose_route([node("d1"), node("p1", Role.PREFILL, running=1)], 100, 16, CFG).prefill is None  # 100 + 128
    assert choose_route([node("d1"), node("b1", Role.BOTH, running=3)], 100, 16, CFG).prefill.node_id == "b1"
    tracker = LoadTracker(report_age_s=0.6)
    found = Matches.of((c.record, c.load, c.cached_blocks) for c in [node("d1"), node("p1", Role.PREFILL)])
    first = choose_route(Candidates.from_matches(found, flying=tracker.columns(found.rows)[0]), 100, 16, CFG)
    assert first.prefill.node_id == "p1"
    tracker.started(first)  # sent, not yet in P's report
    second = choose_route(Candidates.from_matches(found, flying=tracker.columns(found.rows)[0]), 100, 16, CFG)
    assert second.prefill is None and second.decode.node_id == "d1"


def test_a_decode_node_slow_to_take_over_a_prefill_computes_a_short_miss_itself():
    """D's engine declares what taking over P's prefill costs its first token (vLLM's connector: engine steps)."""
    p = node("p1", Role.PREFILL, cached_blocks=20)
    for handover, lacking, handed_over in [(0.0, 100, True), (128.0, 100, False), (128.0, 500, True)]:
        d = node("d1", cached_blocks=20, handover=handover)
        route = choose_route([p, d], 320 + lacking, 16, CFG)  # P lacks what D lacks: 100 + 128 > 2 x 100
        assert route.decode.node_id == "d1" and (route.prefill is not None) == handed_over, (handover, lacking)


def test_a_both_node_prefills_for_another_only_when_that_is_cheaper_outright():
    """h holds more of the prompt but is busy, so o decodes; h's prefill (148 lacking + one queued)
    costs 276 against the 180 tokens o lacks: worth it for a prefill-only node (<= 2 x 180), whose
    job it is, but not for a `both` node, which would stall its own decodes for it."""
    h = node("h", Role.BOTH, cached_blocks=22, running=3, waiting=1)
    o = node("o", Role.BOTH, cached_blocks=20)
    assert CFG.both_prefill_worth == 1.0
    route = choose_route([h, o], 500, 16, CFG)
    assert route.decode.node_id == "o" and route.prefill is None
    route = choose_route([h, o], 500, 16, msgspec.structs.replace(CFG, both_prefill_worth=2.0))
    assert route.decode.node_id == "o" and route.prefill.node_id == "h"
    h_prefill_only = node("h", Role.PREFILL, cached_blocks=22, running=0, waiting=1)
    route = choose_route([h_prefill_only, o], 500, 16, CFG)
    assert route.decode.node_id == "o" and route.prefill.node_id == "h"


def test_prefill_node_is_chosen_by_its_own_cached_prefix():
    cands = [node("d1"), node("p1", Role.PREFILL, cached_blocks=2), node("p2", Role.PREFILL, cached_blocks=20)]
    route = choose_route(cands, 500, 16, CFG)
    assert route.prefill.node_id == "p2" and route.prefill_cached_tokens == 320


def test_prefill_node_that_is_not_worth_it_is_skipped():
    # D lacks 100 tokens; P would have to compute all 500 (> 2 x 100): D prefills locally.
    route = choose_route([node("d1", cached_blocks=25), node("p1", Role.PREFILL)], 500, 16, CFG)
    assert route.prefill is None
    queued = [node("d1"), node("p1", Role.PREFILL, waiting=9)]  # over max_prefill_queue
    assert choose_route(queued, 500, 16, CFG).prefill is None


def test_a_busy_holder_of_a_shared_prefix_supplies_it_instead_of_taking_the_session():
    """A shared prefix cached only on a busy node: an idle node decodes and pulls it from there (the
    holder computes the 60 tokens it lacks), rather than the session piling onto the holder or the
    idle node recomputing 640 cached tokens."""
    cands = [node("holder", Role.BOTH, cached_blocks=40, running=3), node("idle", Role.BOTH)]
    route = choose_route(cands, 700, 16, CFG)
    assert route.decode.node_id == "idle" and route.prefill.node_id == "holder"
    assert route.prefill_cached_tokens == 640 and route.planned_transfer_blocks == 44
    # A holder whose prefill queue is full supplies nothing: the idle node recomputes all 700.
    queued = [node("holder", Role.BOTH, cached_blocks=40, waiting=9), node("idle", Role.BOTH)]
    route = choose_route(queued, 700, 16, CFG)
    assert route.decode.node_id == "idle" and route.prefill is None


def test_roles_are_respected():
    only_prefill = choose_route([node("p1", Role.PREFILL), node("p2", Role.PREFILL, cached_blocks=2)], 500, 16, CFG)
    assert only_prefill.decode.node_id == "p2"  # no decode node live: a prefill node decodes (its cached prefix wins)
    with pytest.raises(NoWorkers):
        choose_route([], 100, 16, CFG)
    both = choose_route([node("b1", Role.BOTH), node("b2", Role.BOTH, cached_blocks=1)], 500, 16,
                        msgspec.structs.replace(CFG, both_prefill_worth=2.0))  # b1's 500 > the 484 b2 lacks
    assert both.decode.node_id == "b2" and both.prefill.node_id == "b1"  # a `both` node never prefills for itself


def test_nodes_that_disagree_on_block_size_or_model_are_refused_loudly():
    with pytest.raises(ClusterMisconfigured, match="block_size"):
        choose_route([node("d1"), node("d2", block_size=32)], 100, 16, CFG)
    with pytest.raises(ClusterMisconfigured):
        choose_route([node("d1"), node("d2", fingerprint="other")], 100, 16, CFG)


class FakeIndex:
    def __init__(self, result=None, error: Exception | None = None, delay_s: float = 0.0):
        self.result, self.error, self.delay_s = result, error, delay_s

    async def lookup_matches(self, hashes):
        await asyncio.sleep(self.delay_s)
        if self.error:
            raise self.error
        return Matches.of(self.result)


def ask(hashes: list[int], prompt_tokens: int, max_tokens: int, affinity: str | None, session: str | None = None) -> SimpleNamespace:
    """What the router reads of a turn."""
    return SimpleNamespace(block_hashes=hashes, prompt_ids=[0] * prompt_tokens, max_tokens=max_tokens, affinity=affinity,
                           session=SimpleNamespace(worker_key=session) if session else None)  # fmt: skip


def test_a_lease_counts_its_nodes_busy_until_it_ends_and_reroutes_once(aio):
    d1, d2 = node("d1"), node("d2")
    router = Router(FakeIndex([(d1.record, d1.load, 30), (d2.record, d2.load, 0)]), lambda: [], CFG)

    async def main():
        async with router.lease(ask([1, 2, 3], 500, 16, None)) as lease:
            assert lease.route.decode.node_id == "d1" and router.loads.in_flight["d1"] == 1
            moved = await lease.reroute("d1")
            assert moved.decode.node_id == "d2" and router.loads.in_flight == {"d1": 0, "d2": 1}
            assert await lease.reroute("d2") is None  # one re-route per turn
        assert router.loads.in_flight == {"d1": 0, "d2": 0}

    aio.run(main())


def test_a_prefill_node_is_free_again_once_its_prefill_is_done(aio):
    """P's share of a disaggregated turn ends with its prefill; D's with the turn: a `both` node that
    prefilled a turn decoding elsewhere does not count it as its own running sequence any more."""
    d, p = node("d1", Role.DECODE), node("p1", Role.PREFILL)
    router = Router(FakeIndex([(d.record, d.load, 0), (p.record, p.load, 0)]), lambda: [], CFG)

    async def main():
        async with router.lease(ask([1, 2, 3], 500, 16, None)) as first:
            assert first.route.prefill.node_id == "p1" and router.loads.in_flight == {"d1": 1, "p1": 1}
            first.prefill_done()
            first.prefill_done()  # once only
            assert router.loads.in_flight == {"d1": 1, "p1": 0}
            second = await router.choose(ask([4, 5, 6], 500, 16, None))
            assert second.prefill is not None and second.prefill.node_id == "p1"
        assert router.loads.in_flight == {"d1": 0, "p1": 0}

    aio.run(main())


def test_router_is_exact_when_the_index_answers_and_degraded_when_it_does_not(aio):
    d1, d2 = node("d1"), node("d2")
    snapshot = lambda: [(d1.record, d1.load), (d2.record, d2.load)]  # noqa: E731
    exact = Router(FakeIndex([(d1.record, d1.load, 0), (d2.record, d2.load, 30)]), snapshot, CFG)
    route = aio.run(exact.choose(ask([1, 2, 3], 500, 16, "d1")))
    assert route.mode is RouteMode.EXACT and route.decode.node_id == "d2"  # 480 cached tokens beat affinity

    down = Router(FakeIndex(error=RedisConnectionError("gone")), snapshot, CFG)
    route = aio.run(down.choose(ask([1, 2, 3], 500, 16, "d2")))
    assert route.mode is RouteMode.DEGRADED and route.decode.node_id == "d2" and route.decode_cached_tokens == 0

    slow = Router(FakeIndex([], delay_s=1.0), snapshot, RouterConfig(index_timeout_s=0.05))
    assert aio.run(slow.choose(ask([1], 80, 16, None))).mode is RouteMode.DEGRADED


def test_turns_that_arrive_together_do_not_herd_onto_one_node(aio):
    """Both nodes hold the same prefix and report no load: the gateway's own in-flight turns spread them."""
    d1, d2 = node("d1", cached_blocks=30), node("d2", cached_blocks=30)
    router = Router(FakeIndex([(d1.record, d1.load, 30), (d2.record, d2.load, 30)]), lambda: [], CFG)
    chosen = []
    for _ in range(4):
        route = aio.run(router.choose(ask([1, 2, 3], 500, 16, None)))
        router.loads.started(route)
        chosen.append(route.decode.node_id)
    assert sorted(chosen) == ["d1", "d1", "d2", "d2"]


def test_new_sessions_take_turns_over_nodes_that_look_alike(aio):
    """Idle-looking nodes (their sessions between calls) tie: each decision's tie goes to the node
    after the last one chosen, round robin, not always to the lowest id."""
    nodes = [node(f"d{i}", cached_blocks=30) for i in range(3)]
    router = Router(FakeIndex([(n.record, n.load, 30) for n in nodes]), lambda: [], CFG)
    chosen = [aio.run(router.choose(ask([1, 2, 3], 500, 16, None))).decode.node_id for _ in range(6)]
    assert chosen == ["d0", "d1", "d2", "d0", "d1", "d2"]


def test_sessions_between_calls_count_on_their_node_so_new_sessions_spread(aio):
    """s1 and s2 ran on d0 and are running tools: a new session goes to d1, though d0 reports nothing
    running. s1's own next turn still goes back to d0 (it does not count against itself)."""
    now = [100.0]
    nodes = [node(f"d{i}", cached_blocks=30) for i in range(2)]
    router = Router(FakeIndex([(n.record, n.load, 30) for n in nodes]), lambda: [], CFG)
    router.loads.clock = lambda: now[0]
    on_d0 = Route(RouteMode.EXACT, nodes[0].record, None, 500, 16, 480)
    for session in ("s1", "s2"):
        router.loads.started(on_d0, session)
        router.loads.finished(on_d0, session)
    assert router.loads.idle()["d0"] == 2 and router.loads.idle(excluding="s1")["d0"] == 1
    assert aio.run(router.choose(ask([1, 2, 3], 500, 16, None, "s3"))).decode.node_id == "d1"
    assert aio.run(router.choose(ask([1, 2, 3], 500, 16, "d0", "s1"))).decode.node_id == "d0"
    now[0] += CFG.session_idle_s + 1  # gone quiet: no longer counted
    assert router.loads.idle()["d0"] == 0


def test_a_stale_report_of_the_gateways_own_finished_turns_does_not_repel_the_next_turn(aio):
    """d1 still reports the 4 turns that just finished there; the session's next turn goes back to it."""
    now = [100.0]
    d1, d2 = node("d1", running=4), node("d2")
    router = Router(FakeIndex([(d1.record, d1.load, 30), (d2.record, d2.load, 28)]), lambda: [], CFG)
    router.loads.clock = lambda: now[0]
    finished = [aio.run(router.choose(ask([1], 500, 16, None))) for _ in range(4)]
    for route in finished:
        route.decode = d1.record  # they ran on d1
        router.loads.started(route)
        router.loads.finished(route)
    assert aio.run(router.choose(ask([1, 2, 3], 500, 16, "d1"))).decode.node_id == "d1"
    now[0] += CFG.load_report_age_s + 0.1  # a report this old would not count them any more
    assert aio.run(router.choose(ask([1, 2, 3], 500, 16, "d1"))).decode.node_id == "d2"


def test_baseline_policies_for_benchmarks():
    from gateway.router import choose_baseline

    cands = [node("b2", Role.BOTH, cached_blocks=30), node("b1", Role.BOTH), node("p1", Role.PREFILL)]
    picks = [choose_baseline(cands, 500, "round_robin", turn).decode.node_id for turn in range(4)]
    assert picks == ["b1", "b2", "b1", "b2"]  # in turn, whatever they hold
    sticky = choose_baseline(cands, 500, "sticky", 0, affinity="b2")
    assert sticky.decode.node_id == "b2" and sticky.prefill is None and sticky.decode_cached_tokens == 480
    assert choose_baseline(cands, 500, "sticky", 1, affinity="gone").decode.node_id == "b2"


def reference_choose_route(candidates, prompt_tokens, max_tokens, config, *, mode=RouteMode.EXACT, affinity=None, after=None):
    """choose_route as it was before it priced nodes as arrays (and before the shortlist of git
    dbe6d30): every candidate through the cost function in Python, one at a time; ties in rotated id
    order (the ids after `after` first). The property test below holds choose_route to it. Since
    2026-12-03 a prefill-only node's queue counts what it runs, a hand-over costs D its declared
    handover_tokens, and a `both` P is held to both_prefill_worth, here as in choose_route."""

    def tie(node_id):
        return (after is not None and node_id <= after, node_id)

    if not candidates:
        raise NoWorkers("no worker is registered")
    check_compatible([c.record for c in candidates])
    bs = candidates[0].record.block_size

    def cached(c):
        return min(c.cached_blocks * bs, prompt_tokens)

    def busy(c, need_tokens):
        cost = config.load_tokens * (c.load.running + c.load.waiting + config.idle_session_weight * c.idle_sessions)
        need_blocks = -(-need_tokens // bs)
        if c.load.total_blocks and c.load.free_blocks < need_blocks:
            cost += config.load_tokens * FULL_PENALTY_SEQS
        return cost

    def prefill_cost(c):
        miss = prompt_tokens - cached(c)
        full = c.load.total_blocks and c.load.free_blocks < -(-miss // bs)
        queued = c.load.waiting if c.record.role in (Role.DECODE, Role.BOTH) else c.load.running + c.load.waiting
        return miss + config.load_tokens * (queued + (FULL_PENALTY_SEQS if full else 0))

    sources = [c for c in candidates if c.record.role in (Role.PREFILL, Role.BOTH) and c.load.waiting <= config.max_prefill_queue]
    source = max(sources, key=lambda c: (cached(c), -prefill_cost(c)), default=None)

    def obtain(c):
        miss = prompt_tokens - cached(c)
        if source is None or cached(source) <= cached(c) or miss <= config.prefill_threshold_tokens:
            return miss
        lacking_blocks = -(-prompt_tokens // bs) - cached(c) // bs
        return min(miss, prefill_cost(source) + config.transfer_tokens_per_block * lacking_blocks + c.record.handover_tokens)

    def decode_cost(c):
        miss = prompt_tokens - cached(c)
        return obtain(c) + busy(c, miss + max_tokens) - (config.affinity_tokens if c.node_id == affinity else 0.0)

    decoders = [c for c in candidates if c.record.role in (Role.DECODE, Role.BOTH)] or list(candidates)
    d = min(decoders, key=lambda c: (decode_cost(c), tie(c.node_id)))
    d_miss = prompt_tokens - cached(d)
    route = Route(mode, d.record, None, prompt_tokens, bs, cached(d))
    if d_miss <= config.prefill_threshold_tokens:
        return route
    prefillers = [c for c in sources if c.node_id != d.node_id and prompt_tokens - cached(c) <= d_miss + bs]
    p = min(prefillers, key=lambda c: (prefill_cost(c), tie(c.node_id)), default=None)
    worth = config.both_prefill_worth if p is not None and p.record.role == Role.BOTH else config.prefill_worth
    if p is not None and prefill_cost(p) + d.record.handover_tokens <= worth * d_miss:
        route.prefill, route.prefill_cached_tokens = p.record, cached(p)
    return route


# A cluster drawn from a few load profiles, so that many nodes tie on everything but their id (ties
# are where array pricing could pick another node than the reference); ids are shuffled so that
# list order is not id order.
profiles = st.tuples(
    st.sampled_from([Role.DECODE, Role.PREFILL, Role.BOTH]),
    st.sampled_from([0, 0, 0, 1, 2, 5, 9]),  # cached blocks, mostly none
    st.sampled_from([0, 1, 2, 3, 9, 10]), st.sampled_from([0, 1, 2, 9]),  # running + waiting; waiting (if <= the sum)
    st.integers(0, 4), st.sampled_from([0, 10_000]),  # free blocks around what it lacks (below); total 0 = never full
    st.sampled_from([0, 0, 1, 3]),  # idle sessions
    st.sampled_from([0.0, 0.0, 128.0]),  # what taking over a prefill costs the node (vLLM's connector)
)


@st.composite
def near_profiles(draw):
    """A few profiles that differ from one another in one field (or not at all): the nodes that the
    cost function must tell apart."""
    base = draw(profiles)
    pool = [base]
    for _ in range(draw(st.integers(0, 5))):
        field, other = draw(st.integers(0, len(base) - 1)), draw(profiles)
        pool.append(base[:field] + (other[field],) + base[field + 1 :])
    return pool


@st.composite
def clusters(draw):
    pool = draw(st.one_of(near_profiles(), st.lists(profiles, min_size=1, max_size=6)))
    n = draw(st.integers(1, 40))
    ids = draw(st.permutations([f"n{i:02d}" for i in range(n)]))
    bs = draw(st.sampled_from([1, 4, 16]))
    prompt_tokens, max_tokens = draw(st.integers(0, 160)), draw(st.integers(0, 64))
    cands = []
    for node_id in ids:
        role, cached_blocks, busy, waiting, near, total, idle, handover = draw(st.sampled_from(pool))
        miss = prompt_tokens - min(cached_blocks * bs, prompt_tokens)  # free on either side of both "full" thresholds
        free = [max(0, -(-miss // bs) - 1), -(-miss // bs), -(-(miss + max_tokens) // bs) - 1, -(-(miss + max_tokens) // bs), 10_000][near]
        waiting = min(waiting, busy)
        running = busy - waiting
        record = node(node_id, role, block_size=bs, handover=handover).record
        cands.append(Candidate(record, NodeLoad(running, waiting, free, total), cached_blocks, idle))
    affinity = draw(st.sampled_from([None, "gone", *ids]))
    after = draw(st.sampled_from([None, "n", "zz", *ids]))  # the last decision's node: ties rotate past it
    return cands, affinity, after, prompt_tokens, max_tokens


configs = st.builds(
    RouterConfig,
    prefill_threshold_tokens=st.sampled_from([0, 8, 64]),
    load_tokens=st.sampled_from([0.0, 1.0, 0.5, 16.0, 128.0]),  # 0: load ignored, every node ties
    affinity_tokens=st.sampled_from([0.0, 16.0, 256.0]),
    prefill_worth=st.sampled_from([0.5, 1.0, 2.0]),
    both_prefill_worth=st.sampled_from([0.5, 1.0, 2.0]),
    max_prefill_queue=st.sampled_from([0, 1, 2, 8]),
    transfer_tokens_per_block=st.sampled_from([0.0, 0.1, 1.0, 40.0]),
    idle_session_weight=st.sampled_from([0.0, 0.5, 1.0]),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), configs)
def test_pricing_every_node_at_once_routes_exactly_as_pricing_them_one_by_one(cluster, config):
    cands, affinity, after, prompt_tokens, max_tokens = cluster
    new = choose_route(cands, prompt_tokens, max_tokens, config, affinity=affinity, after=after)
    old = reference_choose_route(cands, prompt_tokens, max_tokens, config, affinity=affinity, after=after)
    assert outcome(new) == outcome(old)


def outcome(route: Route) -> tuple:
    prefill = route.prefill.node_id if route.prefill else None
    return route.mode, route.decode.node_id, prefill, route.decode_cached_tokens, route.prefill_cached_tokens


def test_the_router_tells_apart_nodes_that_differ_only_in_room_for_the_prompt():
    """p0 and p1 lack room for the prompt's 32 blocks, p2 has it (all three lack room for 33, the
    decode reservation): only p2's prefill is worth it, though its id is the highest."""
    cands = [node("d1"), node("p0", Role.PREFILL, free=10), node("p1", Role.PREFILL, free=10), node("p2", Role.PREFILL, free=32)]
    route = choose_route(cands, 500, 16, CFG)
    assert route.prefill.node_id == "p2"
    assert reference_choose_route(cands, 500, 16, CFG).prefill.node_id == "p2"


def test_the_load_tracker_counts_per_node_however_many_nodes_it_has_seen():
    """Its counts are columns that grow with the node ids seen; a decision reads them in row order."""
    now = [0.0]
    tracker = LoadTracker(report_age_s=1.0, clock=lambda: now[0])
    nodes = [node(f"n{i:02d}") for i in range(40)]
    for i, n in enumerate(nodes):
        route = Route(RouteMode.EXACT, n.record, None, 100, 16, 0)
        for _ in range(i % 3):
            tracker.started(route)
        if i % 3 == 2:  # one of its two turns ends, a session's
            tracker.finished(route, session=f"s{i}")
    rows = Matches.of([(n.record, n.load, 0) for n in reversed(nodes)]).rows  # rows come in id order
    flying, ended, idle = tracker.columns(rows)
    assert flying.tolist() == [min(i % 3, 1) for i in range(40)]
    assert ended.tolist() == idle.tolist() == [int(i % 3 == 2) for i in range(40)]
    assert tracker.columns(rows, session="s2")[2][2] == 0  # the session being routed does not count against its node
    now[0] = 1.5  # older than a report can be: no longer subtracted from reports
    assert tracker.columns(rows)[1].sum() == 0 and tracker.in_flight["n05"] == 1


def test_router_weights_come_from_key_value_pairs_and_bad_ones_are_named():
    """`agentkv gateway --router` / $AGENTKV_ROUTER: the defaults are this CPU's calibration."""
    assert router_config("") == RouterConfig()
    got = router_config(" readback_tokens=0, load_tokens = 64.5,max_prefill_queue=2 ", policy="sticky")
    assert got == RouterConfig(policy="sticky", readback_tokens=0.0, load_tokens=64.5, max_prefill_queue=2)
    for spec, says in [("bogus=1", "unknown router weight 'bogus'"), ("policy=sticky", "unknown router weight 'policy'"),
                       ("load_tokens", "write key=value"), ("load_tokens=abc", "expected a number"),
                       ("max_prefill_queue=1.5", "expected an integer"), ("load_tokens=-1", ">= 0"), ("prefill_worth=nan", "finite")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)):
            router_config(spec)
