"""`agentkv plan`: how many of N workers should prefill and how many decode, for a workload and SLOs.

Each call prefills only what an ideal shared cache lacks (bench/simworkload.with_ideal_reuse): the
planner sizes the cluster for prefix-aware routing, not for the router's own losses.

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
from bench.simworkload import agent_sessions, trace_sessions, with_ideal_reuse
from bench.workersim import Calibration, Cluster, SimSession, Split

ATTAINMENT = 0.9
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
    bs = cal.block_size
    if trace is not None:  # the rate is a load multiplier here: the trace's arrivals sped up by it
        base = with_ideal_reuse(trace_sessions(trace, bs), bs)
    else:  # Poisson arrivals at rate r are those at rate 1 with every time divided by r
        base = with_ideal_reuse(agent_sessions(workload or AgentWorkload(), sessions_per_worker * workers, 1.0, bs), bs)
    make = lambda rate: [msgspec.structs.replace(s, start_s=s.start_s / rate) for s in base]  # noqa: E731
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
