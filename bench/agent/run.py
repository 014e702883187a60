"""`agentkv bench agent`: every mode in one run, on one machine, one JSON object at the end.

Modes are run grouped by the system they need, so each topology's workers start once (the three
routing policies share one pair of workers, each behind its own gateway). A system that fails to
start marks its modes with an error and the run goes on. Progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.agent import metrics, mooncake, report
from bench.agent.driver import Driver, DriveResult
from agentkv.stack import Stack, StackError, first_cores, vllm_python
from bench.agent.modes import MODES, Mode, kv_bytes_per_block, topologies, transformers_serve, vllm_serve
from bench.agent.workload import AgentWorkload, build_plan, shared_prefix_tokens

# Sized for this 2-core CPU (~150 decode tok/s batched, ~250 prefill tok/s; the peer is several
# times slower): the whole quick run, three system starts included, aims at under 10 minutes.
QUICK_AGENT = AgentWorkload(sessions=4, turns=3, system_words=250, tools=5, task_words=20, tool_output_words=100,
                            user_words=10, max_tokens=12)  # fmt: skip
FULL_AGENT = AgentWorkload(sessions=8, turns=6, system_words=600, tools=8, task_words=32, tool_output_words=250,
                           user_words=16, max_tokens=48, arrival="poisson", session_rate_per_s=0.5)  # fmt: skip
# Head-of-line mix: agents arriving over time whose turns add little (a short prefill each), and
# long documents arriving among them.
QUICK_HOL = AgentWorkload(sessions=6, turns=4, system_words=300, tools=4, task_words=16, tool_output_words=12,
                          user_words=6, max_tokens=8, arrival="poisson", session_rate_per_s=0.5, think_time_s=1.0,
                          long_docs=2, long_doc_words=1200, long_doc_max_tokens=4, long_doc_start_s=2.0,
                          long_doc_gap_s=6.0)  # fmt: skip
FULL_HOL = AgentWorkload(sessions=8, turns=6, system_words=400, tools=6, task_words=16, tool_output_words=12,
                         user_words=6, max_tokens=24, arrival="poisson", session_rate_per_s=0.5, think_time_s=1.0,
                         long_docs=8, long_doc_words=2000, long_doc_max_tokens=16, long_doc_start_s=1.0,
                         long_doc_gap_s=6.0)  # fmt: skip

KV_CACHE_GB = 1.0  # per agentkv worker, and the peer's bound
CORES = len(first_cores(2))  # every mode runs on the same cores: goodput per core divides by these
SWEEP_ATTAINMENT = 0.9  # DistServe's bar: the highest load at which 90% of requests meet both objectives

Log = Callable[[str], None]


class TraceReplay(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    length_scale: float = 0.25
    time_scale: float = 1.0
    max_requests: int | None = None


def run(
    quick: bool = True,
    out_dir: str | Path | None = None,
    *,
    modes: list[str] | None = None,
    model: str = "smollm2",
    block_size: int = 16,
    agent: AgentWorkload | None = None,
    hol: AgentWorkload | None = None,
    trace: TraceReplay | None = None,
    slo: metrics.Slo = metrics.Slo(),
    sweep_rates: tuple[float, ...] = (),
    log: Log | None = None,
) -> dict[str, Any]:
    """Run the selected modes (default: all) and return the result; files go to `out_dir`.
    The vLLM modes run vLLM with $AGENTKV_VLLM_PYTHON, else .venv-vllm. `sweep_rates`: also run
    each mode's workload with Poisson session arrivals at these rates (sessions/s) and report the
    highest rate at which SWEEP_ATTAINMENT of the requests met both objectives."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    say = log or _stderr(started)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="agentkv-bench-agent-"))
    (out / "outcomes").mkdir(parents=True, exist_ok=True)
    unknown = set(modes or ()) - {m.name for m in MODES}
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {[m.name for m in MODES]}")
    selected = [m for m in MODES if modes is None or m.name in modes]
    workloads = {"agent": agent or (QUICK_AGENT if quick else FULL_AGENT), "hol_mix": hol or (QUICK_HOL if quick else FULL_HOL)}

    from workers.loader import resolve_model_path

    model_dir = Path(resolve_model_path(model)[0])
    bench = _Bench(workloads, trace, block_size, lambda bs: kv_bytes_per_block(model, bs), _chat_encoder(model_dir), out, say,
                   slo, sweep_rates)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    python = vllm_python()
    topo = topologies(python)
    for (system, topology), group in itertools.groupby(selected, key=lambda m: (m.system, m.topology)):
        group = list(group)
        say(f"starting {system} ({topology}) for {', '.join(m.name for m in group)}")
        try:
            bs = bench.block_size_of(group[0])
            if system == "agentkv":
                if topology.startswith("vllm_") and not python:
                    raise StackError("no vLLM interpreter: set AGENTKV_VLLM_PYTHON or build .venv-vllm (make test does)")
                with Stack(workers=topo[topology], routings=tuple(m.routing for m in group), port=0, model=model,
                           block_size=bs, kv_cache_gb=KV_CACHE_GB, session_ttl_s=120.0, start_timeout_s=900.0,
                           log_dir=out / "logs" / topology) as stack:  # fmt: skip
                    for mode in group:
                        results[mode.name] = bench.measure_safely(mode, stack.urls[mode.routing])
            elif system == "vllm":
                with vllm_serve(python, model_dir, out / "logs" / topology, kv_cache_gb=KV_CACHE_GB, block_size=bs) as url:
                    for mode in group:
                        results[mode.name] = bench.measure_safely(mode, url)
            else:
                with transformers_serve(model_dir, out / "logs" / topology, kv_cache_gb=KV_CACHE_GB,
                                        kv_bytes_per_token=bench.bytes_per_block(bs) // bs) as url:  # fmt: skip
                    for mode in group:
                        results[mode.name] = bench.measure_safely(mode, url)
        except StackError as exc:
            say(f"{system} ({topology}) failed: {exc}")
            for mode in group:
                results.setdefault(mode.name, {**bench.describe(mode), "error": str(exc)})

    result: dict[str, Any] = {
        "bench": "agent",
        "quick": quick,
        "model": model,
        "block_size": block_size,
        "kv_bytes_per_block": bench.bytes_per_block(block_size),
        "cores": first_cores(2),
        "router": os.environ.get("AGENTKV_ROUTER", ""),  # weights the gateways ran with beside the defaults
        "vllm_decode_step_tokens": os.environ.get("AGENTKV_VLLM_DECODE_STEP_TOKENS", ""),  # vLLM decode workers' step budget
        # Other work on a shared machine slows every mode: the 1-minute load average around the run.
        "load_avg_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "workloads": {name: msgspec.to_builtins(w) for name, w in workloads.items()},
        "slo": {**msgspec.to_builtins(slo), "sweep_attainment": SWEEP_ATTAINMENT},
        "modes": results,
    }
    if trace is not None:
        result["workloads"]["mooncake"] = msgspec.to_builtins(trace)
    result["targets"] = report.targets(results)
    result["files"] = {"json": str(out / "agent.json"), "markdown": str(out / "agent.md"),
                       **report.plots(bench.ttfts, bench.reuse, out)}  # fmt: skip
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    (out / "agent.md").write_text(report.markdown(result))
    (out / "agent.json").write_text(json.dumps(result, indent=2))
    say(f"done in {result['elapsed_s']:.0f} s; table, plots and per-request outcomes in {out}")
    return result


class _Bench:
    """What every mode shares: workloads, the ceiling's tokenizer, where outcomes and plot data go."""

    def __init__(self, workloads: dict[str, AgentWorkload], trace: TraceReplay | None, block_size: int,
                 bytes_per_block: Callable[[int], int], encode: Callable[[list[dict]], list[int]], out: Path, say: Log,
                 slo: metrics.Slo = metrics.Slo(), sweep_rates: tuple[float, ...] = ()) -> None:  # fmt: skip
        self.workloads = workloads
        self.trace = trace
        self.block_size = block_size  # the run's; a mode may have its own (vLLM's)
        self.bytes_per_block = functools.cache(bytes_per_block)
        self.encode = encode
        self.out = out
        self.say = say
        self.slo = slo
        self.sweep_rates = sweep_rates
        self.ttfts: dict[str, list[float]] = {}
        self.reuse: dict[str, dict[int, float]] = {}

    def workload_name(self, mode: Mode) -> str:
        return "mooncake" if mode.workload == "agent" and self.trace is not None else mode.workload

    def block_size_of(self, mode: Mode) -> int:
        return mode.block_size or self.block_size

    def describe(self, mode: Mode) -> dict[str, Any]:
        notes = {
            "agent": "agent sessions; latency over every turn",
            "mooncake": "Mooncake trace replay (open loop); latency over every request",
            "hol_mix": "head-of-line mix: agent sessions with short turns plus long documents; latency over the agent "
                       "turns (the short requests), long documents under long_docs; out_tok_s counts both",
        }  # fmt: skip
        workload = self.workload_name(mode)
        return {"system": mode.system, "topology": mode.topology, "routing": mode.routing, "workload": workload,
                "workload_note": notes[workload], "block_size": self.block_size_of(mode)}  # fmt: skip

    def measure_safely(self, mode: Mode, url: str) -> dict[str, Any]:
        """A mode that breaks (the server stops answering /v1/models, ...) is reported, not fatal."""
        try:
            return self.measure(mode, url)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the other modes still run
            self.say(f"{mode.name} failed: {type(exc).__name__}: {exc}")
            return {**self.describe(mode), "error": f"{type(exc).__name__}: {exc}"}

    def measure(self, mode: Mode, url: str) -> dict[str, Any]:
        name, bs = self.workload_name(mode), self.block_size_of(mode)
        self.say(f"{mode.name}: running the {name} workload against {url}")
        nonce = f"{mode.name}-{secrets.token_hex(4)}"
        if name == "mooncake":
            requests = mooncake.replay_plan(
                mooncake.load_trace(self.trace.path), length_scale=self.trace.length_scale,
                time_scale=self.trace.time_scale, max_requests=self.trace.max_requests, nonce=nonce,
            )  # fmt: skip
            drive = asyncio.run(_drive(url, lambda d: d.run_replay(requests)))
            reusable = dict(zip((r.id for r in requests), mooncake.reusable_tokens(requests, bs)))
            ceilings = metrics.replay_ceilings(drive.outcomes, reusable)
        else:
            plan = build_plan(self.workloads[name], nonce)
            drive = asyncio.run(_drive(url, lambda d: d.run_agent(plan)))
            ceilings = metrics.agent_ceilings(drive.outcomes, shared_prefix_tokens(plan, self.encode), bs)
        summary = metrics.summarize(drive, ceilings, bs, self.bytes_per_block(bs), self.slo)
        (self.out / "outcomes" / f"{mode.name}.json").write_bytes(msgspec.json.encode(drive))
        timed = [o for o in drive.outcomes if o.kind in metrics.REUSE_KINDS and o.ok and o.ttft_s is not None]
        self.ttfts[mode.name] = [o.ttft_s for o in timed]
        self.reuse[mode.name] = metrics.reuse_by_turn(drive.outcomes, ceilings)
        result = {**self.describe(mode), **msgspec.to_builtins(summary), "reuse_by_turn": self.reuse[mode.name],
                  "goodput_rps_per_core": summary.goodput_rps / CORES}  # fmt: skip
        if mode.system != "agentkv":
            result.pop("bytes_moved_ratio")
        if name == "hol_mix":
            result["long_docs"] = metrics.latency(drive.outcomes, "doc")
        if self.sweep_rates and name != "mooncake":
            result["sweep"] = self.sweep(mode, url, self.workloads[name])
        self.say(f"{mode.name}: ttft p50 {_fmt(summary.ttft_p50_s)} s p99 {_fmt(summary.ttft_p99_s)} s, "
                 f"{summary.out_tok_s:.1f} out tok/s, reuse {_fmt(summary.reuse_ratio)}, failed {summary.failed}")  # fmt: skip
        return result


    def sweep(self, mode: Mode, url: str, workload: AgentWorkload) -> dict[str, Any]:
        """The workload again at each offered load (Poisson session arrivals); the answer is the
        highest rate whose requests met both objectives SWEEP_ATTAINMENT of the time."""
        points = []
        for rate in sorted(self.sweep_rates):
            plan = build_plan(msgspec.structs.replace(workload, arrival="poisson", session_rate_per_s=rate),
                              f"{mode.name}-{rate}-{secrets.token_hex(4)}")  # fmt: skip
            drive = asyncio.run(_drive(url, lambda d: d.run_agent(plan)))
            s = metrics.summarize(drive, {}, self.block_size_of(mode), self.bytes_per_block(self.block_size_of(mode)), self.slo)
            points.append({"rate_per_s": rate, "goodput_rps": s.goodput_rps, "slo_attainment": s.slo_attainment["both"],
                           "ttft_p99_s": s.ttft_p99_s, "failed": s.failed})  # fmt: skip
            self.say(f"{mode.name} at {rate}/s: goodput {s.goodput_rps:.2f} req/s, both SLOs met {_fmt(s.slo_attainment['both'])}")
        passing = [p["rate_per_s"] for p in points if (p["slo_attainment"] or 0) >= SWEEP_ATTAINMENT]
        return {"points": points, "max_rate_per_s": max(passing, default=None)}


async def _drive(url: str, work: Callable[[Driver], Any]) -> DriveResult:
    async with Driver(url) as driver:
        return await work(driver)


def _chat_encoder(model_dir: Path) -> Callable[[list[dict]], list[int]]:
    """Messages -> prompt ids the way both servers build them (the model's chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(messages: list[dict]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    return encode


def _stderr(started: float) -> Log:
    def say(message: str) -> None:
        print(f"[bench agent {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
