"""`agentkv demo`: the embedded stack, one agent session on it, and what the cache did per turn.

It runs `examples/agent_loop.py` (the same file a user reads and runs) rather than a copy of it,
so the demo cannot drift from the example. One row per model call: the prompt grows every turn
(history, tool calls, tool results), and from the second turn on almost all of it is cached.
"""

from __future__ import annotations

import json
import runpy
import socket
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_loop.py"
COLUMNS = {"prompt_tokens": "prompt", "cached_tokens": "cached", "transferred_tokens": "transferred",
           "completion_tokens": "completion", "ttft_s": "TTFT s"}  # fmt: skip


class DemoError(RuntimeError):
    """The demo could not run; the message says what to do."""


def run_demo(*, port: int = 8000, as_json: bool = False) -> dict[str, Any]:
    """Start the stack on `port`, run the example's session against it, print the turns, stop."""
    import openai
    from rich.console import Console

    from agentkv import Client
    from agentkv.stack import Stack, StackError

    if not EXAMPLE.is_file():
        raise DemoError(f"{EXAMPLE} is missing: the demo runs the repository's examples/agent_loop.py (use a source checkout)")
    agent_loop = runpy.run_path(str(EXAMPLE))
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise DemoError(f"port {port} is in use (another `agentkv up`?): pass --port, or run "
                            f"`python examples/agent_loop.py --base-url http://127.0.0.1:{port}` against it")  # fmt: skip
    err = Console(stderr=True)
    err.print(f"[bold]agentkv demo[/bold]: starting Valkey, a prefill and a decode worker and the gateway on port {port}\n"
              "[dim](the first run dequantizes the model: about a minute; later starts take seconds)[/dim]")
    started = time.perf_counter()
    try:
        with Stack(port=port) as stack, Client(stack.url) as client:
            err.print(f"[dim]stack ready at {stack.url} in {time.perf_counter() - started:.1f} s (logs in {stack.log_dir})[/dim]")
            started = time.perf_counter()
            session = agent_loop["run_session"](client, on_answer=None if as_json else agent_loop["print_answer"])
            session.delete()
            err.print(f"[dim]session: {len(session.turns)} model calls in {time.perf_counter() - started:.1f} s; stopping[/dim]")
    except StackError as exc:
        raise DemoError(f"the stack did not start: {exc}") from exc
    except openai.OpenAIError as exc:
        raise DemoError(f"the agent session failed: {exc}") from exc
    turns = [{key: getattr(t, key) for key in COLUMNS} for t in session.turns]
    for t in turns:
        t["ttft_s"] = None if t["ttft_s"] is None else round(t["ttft_s"], 3)
    if as_json:
        sys.stdout.write(json.dumps({"turns": turns}) + "\n")
    else:
        Console().print(_table(turns))
    return {"turns": turns}


def _table(turns: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="tokens per model call", header_style="bold")
    for name in ("turn", *COLUMNS.values(), "cached %"):
        table.add_column(name, justify="right")
    for n, t in enumerate(turns, 1):
        share = f"{100 * t['cached_tokens'] / t['prompt_tokens']:.0f}%" if t["prompt_tokens"] else "-"
        table.add_row(str(n), *("-" if v is None else str(v) for v in t.values()), share)
    return table
