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


if __name__ == "__main__":
    app()
