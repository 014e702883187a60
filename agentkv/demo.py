"""`agentkv demo`: the embedded stack, one agent session on it, and what the cache did per turn.

It runs `examples/agent_loop.py` (the same file a user reads and runs) rather than a copy of it,
so the demo cannot drift from the example. One row per model call: the prompt grows every turn
(history, tool calls, tool results), and from the second turn on almost all of it is cached.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_loop.py"
TURN_FIELDS = ("prompt_tokens", "cached_tokens", "transferred_tokens", "completion_tokens", "ttft_s")


class DemoError(RuntimeError):
    """The demo could not run; the message says what to do."""


def load_agent_loop(path: Path = EXAMPLE) -> ModuleType:
    if not path.is_file():
        raise DemoError(f"{path} is missing: the demo runs the repository's examples/agent_loop.py (use a source checkout)")
    spec = importlib.util.spec_from_file_location("agentkv_example_agent_loop", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_demo(*, port: int = 8000, base_url: str | None = None, as_json: bool = False) -> dict[str, Any]:
    """Start the stack on `port` (or use the one at `base_url`), run the session, print, stop."""
    from rich.console import Console

    from agentkv.client import AgentKVError, Client

    agent_loop = load_agent_loop()
    err = Console(stderr=True)
    out = Console()
    stack = None
    try:
        if base_url is None:
            stack = _start_stack(port, err)
            base_url = stack.url
        printer = None if as_json else _answer_printer(out)
        started = time.perf_counter()
        with Client(base_url) as client:
            session = agent_loop.run_session(client, on_answer=printer)
            session.delete()
        err.print(f"[dim]session: {len(session.turns)} model calls in {time.perf_counter() - started:.1f} s[/dim]")
    except AgentKVError as exc:
        raise DemoError(f"the agent session failed: {exc}") from exc
    finally:
        if stack is not None:
            err.print("[dim]stopping the stack ...[/dim]")
            stack.stop()
    result = {"turns": [_turn_row(t) for t in session.turns]}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        out.print(_table(result["turns"]))
    return result


def _start_stack(port: int, err: Any):
    from agentkv.stack import Stack, StackError

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise DemoError(f"port {port} is in use (another `agentkv up`?): pass --port, or run "
                            f"`python examples/agent_loop.py --base-url http://127.0.0.1:{port}` against it")  # fmt: skip
    err.print(f"[bold]agentkv demo[/bold]: starting Valkey, a prefill and a decode worker and the gateway on port {port}")
    err.print("[dim](the first run dequantizes the model: about a minute; later starts take seconds)[/dim]")
    started = time.perf_counter()
    try:
        stack = Stack(port=port).start()
    except StackError as exc:
        raise DemoError(f"the stack did not start: {exc}") from exc
    err.print(f"[dim]stack ready at {stack.url} in {time.perf_counter() - started:.1f} s (logs in {stack.log_dir})[/dim]")
    return stack


def _turn_row(stats: Any) -> dict[str, Any]:
    row = {name: getattr(stats, name) for name in TURN_FIELDS}
    row["ttft_s"] = None if row["ttft_s"] is None else round(row["ttft_s"], 3)
    return row


def _answer_printer(console: Any):
    def show(question: str, result: Any) -> None:
        console.print(f"[bold cyan]user[/bold cyan]: {question}")
        for r in result.tool_results:
            style = "red" if r.is_error else "green"
            console.print(f"  [{style}]tool[/{style}] {r.call.name}({r.call.arguments}) -> {r.content}")
        console.print(f"[bold magenta]assistant[/bold magenta]: {result.content}\n")

    return show


def _table(turns: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="tokens per model call", header_style="bold")
    for name in ("turn", "prompt", "cached", "cached %", "transferred", "completion", "TTFT s"):
        table.add_column(name, justify="right")
    for n, t in enumerate(turns, 1):
        share = f"{100 * t['cached_tokens'] / t['prompt_tokens']:.0f}%" if t["prompt_tokens"] else "-"
        ttft = "-" if t["ttft_s"] is None else f"{t['ttft_s']:.3f}"
        table.add_row(str(n), str(t["prompt_tokens"]), str(t["cached_tokens"]), share, str(t["transferred_tokens"]),
                      str(t["completion_tokens"]), ttft)  # fmt: skip
    return table
