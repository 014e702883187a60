"""`agentkv plan`: how many of N workers should prefill and how many decode, for a workload and SLOs.

Every split is played through the worker model (bench/workersim.py) at rising offered load; a
split's capacity is the highest session rate at which 90% of requests still meet both objectives
(DistServe's measure), and its goodput is what it serves there. Colocated serving (every worker
does both) is a candidate too. Each candidate's figures are printed so the choice is visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.agent.driver import DriveResult
from bench.agent.metrics import Slo, summarize
from bench.agent.mooncake import TraceRecord
from bench.agent.workload import AgentWorkload
from bench.workersim import Calibration, Call, Cluster, SimSession, Split

ATTAINMENT = 0.9
TEMPLATE_TOKENS = 12  # the chat template's tokens around each new message (SmolLM2's)
SEARCH_STEPS = 12  # bisection steps on the rate: 2^-12 of the bracket
MAX_RATE = 1e4


class Candidate(msgspec.Struct, kw_only=True):
    prefill: int  # 0: colocated, every worker prefills and decodes
    decode: int
    max_rate_per_s: float  # sessions (trace: requests) per second at ATTAINMENT of both objectives
    goodput_rps: float  # requests per second meeting both objectives, at that rate
    goodput_rps_per_worker: float
    ttft_p99_s: float | None
    itl_p99_s: float | None

    @property
    def name(self) -> str:
        return f"colocated x{self.decode}" if self.prefill == 0 else f"{self.prefill}P:{self.decode}D"


def agent_sessions(w: AgentWorkload, count: int, rate_per_s: float, seed: int = 0) -> list[SimSession]:
    """`count` sessions of the agent workload arriving as a Poisson process. A call prefills only
    what prefix-aware routing leaves: the task on the first call (the warm-up cached the system
    prompt), then the previous reply and the new tool output and user text."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate(([0.0], np.cumsum(rng.exponential(1 / rate_per_s, count - 1))))
    first = Call(w.task_words + TEMPLATE_TOKENS, w.max_tokens)
    later = Call(w.max_tokens + w.tool_output_words + w.user_words + TEMPLATE_TOKENS, w.max_tokens)
    return [
        SimSession(f"s{i}", float(starts[i]), [first] + [later] * (w.turns - 1),
                   rng.exponential(w.think_time_s, w.turns - 1).tolist() if w.think_time_s else [0.0] * (w.turns - 1))
        for i in range(count)
    ]  # fmt: skip


def trace_sessions(records: list[TraceRecord], load: float, block_tokens: int = 512) -> list[SimSession]:
    """A Mooncake trace, one call per request, its timestamps divided by `load`. A request
    prefills what follows its longest prefix of blocks (hash ids) that an earlier request sent."""
    seen: set[tuple[int, ...]] = set()
    sessions = []
    for i, r in enumerate(records):
        cached = 0
        for n in range(1, len(r.hash_ids) + 1):
            if tuple(r.hash_ids[:n]) not in seen:
                break
            cached = n
        seen.update(tuple(r.hash_ids[:n]) for n in range(1, len(r.hash_ids) + 1))
        new = max(1, r.input_length - min(cached * block_tokens, r.input_length - 1))
        sessions.append(SimSession(f"r{i}", r.timestamp / 1000 / load, [Call(new, max(1, r.output_length))], []))
    return sessions


def evaluate(prefill: int, decode: int, sessions: list[SimSession], cal: Calibration, slo: Slo):
    """The summary of one split serving `sessions` (bench/agent/metrics.Summary)."""
    outcomes = Cluster(prefill + decode, cal, Split(prefill, cal)).run(sessions)
    duration = max(o.sent_s + (o.e2e_s or 0.0) for o in outcomes) - min(o.sent_s for o in outcomes)
    return summarize(DriveResult(outcomes, duration), {}, cal.block_size, 0, slo)


def capacity(prefill: int, decode: int, make: Any, cal: Calibration, slo: Slo, lo: float, hi: float) -> Candidate:
    """Bisect the offered load for the highest rate meeting ATTAINMENT; `make(rate)` builds sessions.
    A split that misses it even at `lo` has no capacity (goodput 0; its p99s are those at `lo`)."""

    def measure(rate: float):
        return evaluate(prefill, decode, make(rate), cal, slo)

    def meets(summary) -> bool:
        return (summary.slo_attainment["both"] or 0.0) >= ATTAINMENT

    rate, at = 0.0, measure(lo)
    if meets(at):
        while hi < MAX_RATE and meets(measure(hi)):
            lo, hi = hi, hi * 2
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if meets(measure(mid)) else (lo, mid)
        rate, at = lo, measure(lo)
    goodput = at.goodput_rps if rate else 0.0
    return Candidate(prefill=prefill, decode=decode, max_rate_per_s=rate, goodput_rps=goodput,
                     goodput_rps_per_worker=goodput / (prefill + decode), ttft_p99_s=at.ttft_p99_s, itl_p99_s=at.itl_p99_s)  # fmt: skip


def plan(workers: int, make: Any, cal: Calibration = Calibration(), slo: Slo = Slo(), lo: float = 0.05, hi: float = 1.0) -> list[Candidate]:
    """Every split of `workers` (colocated, then 1P:(N-1)D ... (N-1)P:1D), best goodput first."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    splits = [(0, workers)] + [(p, workers - p) for p in range(1, workers)]
    candidates = [capacity(p, d, make, cal, slo, lo, hi) for p, d in splits]
    return sorted(candidates, key=lambda c: -c.goodput_rps)


def run(workers: int, *, workload: AgentWorkload | None = None, trace: list[TraceRecord] | None = None,
        cal: Calibration = Calibration(), slo: Slo = Slo(), sessions_per_worker: int = 8,
        out_dir: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The plan as one JSON-able object (and a bar plot of goodput per split when `out_dir` is given)."""
    if trace is not None:
        make = lambda load: trace_sessions(trace, load)  # noqa: E731 - the rate is a load multiplier here
    else:
        w = workload or AgentWorkload()
        make = lambda rate: agent_sessions(w, sessions_per_worker * workers, rate)  # noqa: E731
    candidates = plan(workers, make, cal, slo)
    result = {
        "workers": workers,
        "workload": "mooncake trace (rate = load multiplier)" if trace is not None else msgspec.to_builtins(workload or AgentWorkload()),
        "slo": {**msgspec.to_builtins(slo), "attainment": ATTAINMENT},
        "calibration": msgspec.to_builtins(cal),
        "candidates": [{"split": c.name, **msgspec.to_builtins(c)} for c in candidates],
        "best": candidates[0].name,
    }
    if out_dir is not None:
        result["plot"] = plot(candidates, Path(out_dir))
    return result


def plot(candidates: list[Candidate], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(candidates, key=lambda c: (c.prefill, c.decode))
    fig, ax = plt.subplots(figsize=(max(6, len(ordered) * 0.5), 4))
    ax.bar([c.name for c in ordered], [c.goodput_rps for c in ordered], color=["tab:gray" if c.prefill == 0 else "tab:blue" for c in ordered])
    ax.set(ylabel=f"goodput (req/s meeting both SLOs at {ATTAINMENT:.0%})", title="Predicted goodput per prefill:decode split")
    ax.tick_params(axis="x", rotation=60)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "plan.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
