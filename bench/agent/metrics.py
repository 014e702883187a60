"""What a run's outcomes mean: latency percentiles, throughput, reuse against its ceiling, bytes moved.

reuse_ratio = tokens reused / tokens an ideal cache could have reused. The ideal cache is one
shared, infinite cache in front of every node, working in the same whole blocks and keeping the
last prompt token to compute (the engine needs its logits):

    first turn of a session   the part of its prompt the warm-up request already sent (the
                              templated system prompt and tools)
    turn k > 1                the previous turn's prompt and reply (the gateway continues a
                              session's exact token ids; the reply's last token has no KV yet)
    trace request             its longest prefix shared with an earlier request (mooncake.py); a
                              server that queues may serve a later request first, so one request
                              can exceed its ceiling

Reused tokens are the ones not computed for the request anywhere (usage: prompt - prefilled), so
a prefix found on a prefill node and moved counts as reuse; decode_local_hit_rate counts only what
the decode node already held. bytes_moved_ratio = KV bytes moved from prefill to decode nodes /
bytes of the prompt blocks the decode node lacked, over the turns that moved any: 1.00 means
exactly the missing blocks moved, nothing more and nothing less. A server whose usage never says
what it found cached (no `prompt_tokens_details`) gets no reuse numbers rather than zeros.

Goodput is DistServe's measure: requests per second that met both service-level objectives, the
time to first token and their own inter-token-latency p99 (a request of one token has no gaps and
meets the ITL objective). A failed request meets neither. An agent step is one session of the
workload: several calls separated by tool time, timed from its first call sent to its last call's
last token, since the step is what a user of an agent waits for.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec
import numpy as np

from bench.agent.driver import DriveResult, Outcome

REUSE_KINDS = ("turn", "replay")  # requests with a reuse ceiling (documents have none)
Key = tuple[str, int]  # (outcome id, turn)


class Slo(msgspec.Struct, frozen=True, kw_only=True):
    """The objectives a request must meet to count in goodput. Sized to this 2-core CPU: a 135M
    model's warm turn answers in ~0.5 s and decodes ~25 tokens/s per sequence when batched."""

    ttft_s: float = 1.0
    itl_p99_s: float = 0.25


class Summary(msgspec.Struct, kw_only=True):
    requests: int
    failed: int
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    out_tok_s: float
    output_tokens: int
    duration_s: float
    prompt_tokens: int
    reused_tokens: int
    reusable_tokens: int
    reuse_ratio: float | None
    decode_local_hit_rate: float | None
    bytes_moved_ratio: float | None
    transfer_requests: int  # requests whose KV moved from a prefill node
    goodput_rps: float  # requests per second that met both objectives
    slo_attainment: dict[str, float | None]  # share of requests meeting "ttft", "itl" and "both"
    agent_step_p50_s: float | None
    agent_step_p99_s: float | None
    # agentkv only: TTFT p50 and count per route (local | disaggregated | readback), and the median of each
    # step a P/D turn's first token waited for (hold, prefill): whether handing a prefill over paid
    by_route: dict[str, dict[str, float | int | None]] = msgspec.field(default_factory=dict)
    errors: list[str] = msgspec.field(default_factory=list)  # the first few, to say why `failed` > 0


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def blocks_down(tokens: int, block_size: int) -> int:
    return max(0, tokens) // block_size * block_size


def agent_ceilings(outcomes: list[Outcome], shared: dict[str, int], block_size: int) -> dict[Key, int]:
    """Reusable tokens of each agent turn (see the module docstring). `shared`: session id ->
    tokens its first turn shares with the warm-up."""
    turns = sorted((o for o in outcomes if o.kind == "turn" and o.ok), key=lambda o: (o.id, o.turn))
    out: dict[Key, int] = {}
    prev: Outcome | None = None
    for o in turns:
        if o.turn == 1:
            known = shared.get(o.id, 0)
        elif prev is not None and prev.id == o.id and prev.turn == o.turn - 1:
            known = prev.prompt_tokens + prev.output_tokens - 1
        else:
            known = 0
        out[(o.id, o.turn)] = blocks_down(min(known, o.prompt_tokens - 1), block_size)
        prev = o
    return out


def replay_ceilings(outcomes: list[Outcome], reusable: dict[str, int]) -> dict[Key, int]:
    return {(o.id, o.turn): reusable.get(o.id, 0) for o in outcomes if o.kind == "replay" and o.ok}


def bytes_moved_ratio(outcomes: list[Outcome], block_size: int, bytes_per_block: int) -> tuple[float | None, int]:
    """(moved / lacked over requests with a prefill node, how many such requests)."""
    moved = lacked = n = 0
    for o in outcomes:
        if o.ok and o.agentkv and o.agentkv.prefill_node:
            n += 1
            moved += o.agentkv.transferred_bytes
            lacked += (-(-o.prompt_tokens // block_size) - o.cached_tokens // block_size) * bytes_per_block
    return (moved / lacked if lacked else None), n


def reuse_by_turn(outcomes: list[Outcome], ceilings: dict[Key, int]) -> dict[int, float]:
    """Turn number -> reused / reusable over all sessions at that turn (the reuse-per-turn plot)."""
    reused: dict[int, int] = defaultdict(int)
    ceiling: dict[int, int] = defaultdict(int)
    for o in outcomes:
        c = ceilings.get((o.id, o.turn))
        if c is not None:
            reused[o.turn] += o.reused_tokens
            ceiling[o.turn] += c
    return {t: reused[t] / ceiling[t] for t in sorted(ceiling) if ceiling[t]}


def meets(o: Outcome, slo: Slo) -> tuple[bool, bool]:
    """(met the TTFT objective, met the ITL objective); a failed request meets neither."""
    if not o.ok or o.ttft_s is None:
        return False, False
    itl_p99 = percentile(o.itl_s, 99)
    return o.ttft_s <= slo.ttft_s, itl_p99 is None or itl_p99 <= slo.itl_p99_s


def slo_attainment(outcomes: list[Outcome], slo: Slo) -> dict[str, float | None]:
    """Share of `outcomes` meeting each objective and both (None when there are none)."""
    met = [meets(o, slo) for o in outcomes]
    share = (lambda n: n / len(met)) if met else (lambda n: None)
    return {"ttft": share(sum(t for t, _ in met)), "itl": share(sum(i for _, i in met)), "both": share(sum(t and i for t, i in met))}


def agent_steps(outcomes: list[Outcome]) -> list[float]:
    """Seconds per completed session, first call sent to last call done (a failed session has none)."""
    by_session: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.kind == "turn":
            by_session[o.id].append(o)
    return [max(o.sent_s + o.e2e_s for o in turns) - min(o.sent_s for o in turns)
            for turns in by_session.values() if all(o.ok and o.e2e_s is not None for o in turns)]  # fmt: skip


def summarize(result: DriveResult, ceilings: dict[Key, int], block_size: int, bytes_per_block: int, slo: Slo = Slo()) -> Summary:
    """Latency over the requests with a reuse ceiling; failures and throughput over everything sent."""
    sent = result.outcomes
    timed = [o for o in sent if o.kind in REUSE_KINDS and o.ok]
    itl = [gap for o in timed for gap in o.itl_s]
    ttft = [o.ttft_s for o in timed if o.ttft_s is not None]
    counted = [o for o in sent if o.kind != "warmup" and o.ok]
    with_ceiling = [o for o in timed if (o.id, o.turn) in ceilings]
    reusable = sum(ceilings[(o.id, o.turn)] for o in with_ceiling)
    known = reusable > 0 and any(o.cache_reported for o in with_ceiling)
    reused = sum(o.reused_tokens for o in with_ceiling)
    local = sum(o.cached_tokens for o in with_ceiling)
    moved, transfers = bytes_moved_ratio([o for o in sent if o.ok], block_size, bytes_per_block)
    failed = [o for o in sent if not o.ok]
    output = sum(o.output_tokens for o in counted)
    offered = [o for o in sent if o.kind != "warmup"]
    steps = agent_steps(sent)
    return Summary(
        requests=len([o for o in sent if o.kind != "warmup"]),
        failed=len(failed),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(itl, 50),
        itl_p99_s=percentile(itl, 99),
        out_tok_s=output / result.duration_s if result.duration_s > 0 else 0.0,
        output_tokens=output,
        duration_s=result.duration_s,
        prompt_tokens=sum(o.prompt_tokens for o in with_ceiling),
        reused_tokens=reused,
        reusable_tokens=reusable,
        reuse_ratio=reused / reusable if known else None,
        decode_local_hit_rate=local / reusable if known else None,
        bytes_moved_ratio=moved,
        transfer_requests=transfers,
        goodput_rps=sum(all(meets(o, slo)) for o in offered) / result.duration_s if result.duration_s > 0 else 0.0,
        slo_attainment=slo_attainment(offered, slo),
        agent_step_p50_s=percentile(steps, 50),
        agent_step_p99_s=percentile(steps, 99),
        by_route=by_route(timed),
        errors=[f"{o.kind} {o.id}#{o.turn}: {o.error}" for o in failed[:5]],
    )


def by_route(outcomes: list[Outcome]) -> dict[str, dict[str, float | int | None]]:
    """Per route agentkv took (its usage.agentkv): requests, TTFT p50, and the p50 of the steps D's
    first token waited for on P's side (None where a route has no such step)."""
    routes: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if (a := o.agentkv) is not None and o.ttft_s is not None:
            routes["readback" if a.readback else "disaggregated" if a.prefill_node else "local"].append(o)
    return {name: {"requests": len(done), "ttft_p50_s": percentile([o.ttft_s for o in done], 50),
                   "hold_p50_s": percentile([o.agentkv.hold_s for o in done if o.agentkv.hold_s is not None], 50),
                   "prefill_p50_s": percentile([o.agentkv.prefill_s for o in done if o.agentkv.prefill_s is not None], 50)}
            for name, done in sorted(routes.items())}  # fmt: skip


def latency(outcomes: list[Outcome], kind: str) -> dict[str, float | int | None]:
    """TTFT of one kind of request (the long documents of the head-of-line mix)."""
    done = [o for o in outcomes if o.kind == kind]
    ttft = [o.ttft_s for o in done if o.ok and o.ttft_s is not None]
    return {"requests": len(done), "failed": sum(not o.ok for o in done), "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99)}  # fmt: skip
