"""The `agentkv` command line. Heavy imports happen inside commands so `--help` stays instant."""

from __future__ import annotations

import json
import sys

import typer

app = typer.Typer(help="agentkv: a serving gateway for AI agents with prefix-aware KV reuse.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: one JSON object per run, baselines measured in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@app.command()
def worker(
    role: str = typer.Option("both", help="prefill | decode | both"),
    port: int = typer.Option(8101, help="port of the internal HTTP API"),
    host: str = typer.Option("127.0.0.1"),
    redis_url: str = typer.Option(..., envvar="AGENTKV_REDIS_URL", help="redis:// or rediss:// URL of the index"),
    node_id: str = typer.Option("", help="stable node id (default: host-role-port)"),
    model: str = typer.Option("smollm2", envvar="AGENTKV_MODEL", help="smollm2, a local directory or an HF id"),
    block_size: int = typer.Option(16, min=1),
    kv_cache_gb: float = typer.Option(1.0, help="KV pool size"),
    max_num_seqs: int = typer.Option(64, min=1),
    threads: int = typer.Option(0, help="torch threads (0: one per allowed core)"),
    cpus: str = typer.Option("", help="pin to these cores, e.g. 0 or 0,1"),
    cluster_token: str = typer.Option("", envvar="AGENTKV_CLUSTER_TOKEN", help="required on internal endpoints"),
    transfer: str = typer.Option("nixl", help="KV transfer backend: nixl | ucxx"),
    transfer_timeout: float = typer.Option(10.0, help="seconds before a KV transfer is given up and recomputed"),
    advertise_host: str = typer.Option("", help="host other nodes use to reach this one"),
) -> None:
    """Run a worker: the engine behind the internal API, registered in the Redis index."""
    from kvstore.nodes import Role
    from workers.service import WorkerConfig, run_worker

    try:
        role_value = Role(role)
        cpu_list = [int(c) for c in cpus.split(",") if c.strip()]
    except ValueError:
        _fail(f"--role must be prefill, decode or both (got {role!r}); --cpus a comma list of core numbers")
    if transfer not in ("nixl", "ucxx"):
        _fail(f"--transfer must be nixl or ucxx (got {transfer!r})")
    run_worker(
        WorkerConfig(
            redis_url=redis_url, role=role_value, host=host, port=port, node_id=node_id, model=model,
            block_size=block_size, kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs, threads=threads or None,
            cpus=cpu_list, cluster_token=cluster_token or None, transfer=transfer, transfer_timeout_s=transfer_timeout,
            advertise_host=advertise_host or None,
        )
    )


@bench_app.command("engine")
def bench_engine(
    model: str = typer.Option("smollm2", help="model spec: smollm2, a local directory or an HF id"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    repeats: int = typer.Option(3, min=1),
    skip_load: bool = typer.Option(False, help="skip the first-load (dequantization) measurement"),
) -> None:
    """Engine decode/prefill throughput and TTFT against plain transformers."""
    from bench.engine import run
    from workers.loader import ModelNotFound

    try:
        _emit(run(model=model, repeats=repeats, measure_load=not skip_load), as_json)
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
    from bench.index import run

    _emit(run(blocks=blocks, nodes=nodes, prefix_blocks=prefix_blocks), as_json)


@app.command()
def gateway(
    port: int = typer.Option(8000, help="port of the OpenAI-compatible API"),
    host: str = typer.Option("127.0.0.1"),
    redis_url: str = typer.Option(..., envvar="AGENTKV_REDIS_URL", help="redis:// URL of the index and session store"),
    api_keys: str = typer.Option("", envvar="AGENTKV_API_KEYS", help="key:tenant,key2:tenant2 or @file; none = open"),
    session_ttl: float = typer.Option(300.0, envvar="AGENTKV_SESSION_TTL", help="seconds a session (and its pinned blocks) lives after a turn"),
    cluster_token: str = typer.Option("", envvar="AGENTKV_CLUSTER_TOKEN", help="sent to the workers' internal API"),
    tokenizer: str = typer.Option("", help="tokenizer dir or HF id (default: the workers' model path)"),
    max_tokens: int = typer.Option(256, min=1, help="default max_tokens when a request gives none"),
    routing: str = typer.Option("prefix", help="prefix (the cost function) | sticky | round_robin (baselines)"),
) -> None:
    """Serve the OpenAI-compatible gateway: sessions, prefix-aware routing, P/D orchestration."""
    from gateway.config import GatewayConfig, RouterConfig, parse_api_keys
    from gateway.server import run_gateway

    try:
        keys = parse_api_keys(api_keys)
    except (OSError, ValueError) as exc:
        _fail(f"--api-keys: {exc}")
    if routing not in ("prefix", "sticky", "round_robin"):
        _fail(f"--routing must be prefix, sticky or round_robin (got {routing!r})")
    config = GatewayConfig(redis_url=redis_url, api_keys=keys, session_ttl_s=session_ttl, cluster_token=cluster_token or None,
                           tokenizer=tokenizer or None, default_max_tokens=max_tokens, router=RouterConfig(policy=routing))  # fmt: skip
    run_gateway(config, host=host, port=port)


@app.command()
def up(
    port: int = typer.Option(8000, help="gateway port"),
    model: str = typer.Option("smollm2", envvar="AGENTKV_MODEL"),
    api_keys: str = typer.Option("", envvar="AGENTKV_API_KEYS", help="key:tenant,... (none = open local tenant)"),
    redis_url: str = typer.Option("", help="use this Redis instead of an embedded Valkey"),
    log_dir: str = typer.Option("", help="where the children's logs go (default: a temporary directory)"),
) -> None:
    """Run the whole stack here: Valkey, a prefill and a decode worker (one core each), the gateway."""
    from pathlib import Path

    from agentkv.stack import Stack, run_up

    stack = Stack(port=port, model=model, api_keys=api_keys or None, redis_url=redis_url or None, log_dir=Path(log_dir) if log_dir else None)
    raise typer.Exit(run_up(stack))


@app.command()
def demo(
    as_json: bool = typer.Option(False, "--json", help='print one JSON object {"turns": [...]} instead of the table'),
    port: int = typer.Option(8000, help="gateway port of the embedded stack"),
) -> None:
    """Start the embedded stack, run an agent session (examples/agent_loop.py), show the cache per turn."""
    from agentkv.demo import DemoError, run_demo

    try:
        run_demo(port=port, as_json=as_json)
    except DemoError as exc:
        _fail(str(exc), code=1)


@bench_app.command("agent")
def bench_agent(
    quick: bool = typer.Option(False, "--quick", help="small workloads sized to finish in under 10 minutes on 2 cores"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (progress goes to stderr)"),
    out: str = typer.Option("", "--out", help="directory for agent.json, agent.md, plots and outcomes (default: a new temp dir)"),
    modes: str = typer.Option("", help="comma list of modes (default: all): round_robin,sticky,prefix_aware,colocated,disaggregated,transformers_serve"),
    trace: str = typer.Option("", help="replay this Mooncake-format trace (JSONL) instead of the synthetic agent workload"),
    trace_length_scale: float = typer.Option(0.25, help="scale of the trace's prompt, block and output lengths"),
    trace_time_scale: float = typer.Option(1.0, help="scale of the trace's inter-arrival times"),
    trace_max_requests: int = typer.Option(0, help="replay only the first N requests (0: all)"),
    sessions: int = typer.Option(0, help="agent sessions (0: the preset's)"),
    turns: int = typer.Option(0, help="turns per agent session (0: the preset's)"),
    max_tokens: int = typer.Option(0, help="output tokens per agent turn (0: the preset's)"),
    model: str = typer.Option("smollm2", envvar="AGENTKV_MODEL"),
) -> None:
    """Agent traffic against routing policies, colocated vs disaggregated, and transformers serve."""
    import msgspec

    from bench.agent.mooncake import TraceError
    from bench.agent.run import FULL_AGENT, QUICK_AGENT, TraceReplay, run

    preset = QUICK_AGENT if quick else FULL_AGENT
    changes = {k: v for k, v in {"sessions": sessions, "turns": turns, "max_tokens": max_tokens}.items() if v}
    replay = TraceReplay(path=trace, length_scale=trace_length_scale, time_scale=trace_time_scale,
                         max_requests=trace_max_requests or None) if trace else None  # fmt: skip
    try:
        result = run(quick=quick, out_dir=out or None, modes=[m.strip() for m in modes.split(",") if m.strip()] or None,
                     model=model, agent=msgspec.structs.replace(preset, **changes), trace=replay)  # fmt: skip
    except (ValueError, OSError, TraceError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        with open(result["files"]["markdown"]) as f:
            sys.stdout.write(f.read())


@bench_app.command("transfer")
def bench_transfer(
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    repeats: int = typer.Option(5, min=1),
) -> None:
    """Cross-process KV block transfer throughput (NIXL, ucxx) against a warm memcpy of the same bytes."""
    from bench.transfer import run

    _emit(run(repeats=repeats), as_json)


if __name__ == "__main__":
    app()
