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
            cpus=cpu_list, cluster_token=cluster_token or None, transfer=transfer, advertise_host=advertise_host or None,
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


if __name__ == "__main__":
    app()
