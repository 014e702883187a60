"""The fault suite's shared real stack: `agentkv up`'s launcher and supervisor (agentkv.stack), started
once per test file that asks for it. Tests here kill its processes; the supervisor brings them back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from agentkv.stack import Outage, Stack, Supervisor
from kvstore.wire import Paths


@dataclass
class SupervisedStack:
    """A started stack under a background supervisor; `events` are its lines with their times."""

    stack: Stack
    supervisor: Supervisor
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.stack.url

    def pid(self, name: str) -> int:
        return self.stack.pids()[name]

    def free_blocks(self) -> dict[str, tuple[int, int]]:
        """Each worker's (free, total) pool blocks, from its health endpoint."""
        out = {}
        for name, url in self.stack.nodes.items():
            load = httpx.get(url + Paths.HEALTH, timeout=5).json()["load"]
            out[name] = (load["free_blocks"], load["total_blocks"])
        return out

    def serving(self) -> bool:
        """Nothing down, and the gateway routes to every worker."""
        try:
            health = httpx.get(f"{self.url}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        count = health["node_count"] if "node_count" in health else len(health.get("nodes", []))
        return self.supervisor.healthy() and bool(health.get("ready")) and count >= len(self.stack.nodes)

    def wait_serving(self, timeout_s: float = 120.0) -> float:
        started = time.monotonic()
        while not self.serving():
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"the stack did not recover within {timeout_s} s: {self.events[-5:]}")
            time.sleep(0.2)
        return time.monotonic() - started

    def outage_after(self, name: str, since: float, timeout_s: float) -> Outage:
        """The supervisor's record of `name` dying after `since`, once it serves again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [o for o in self.supervisor.outages if o.name == name and o.died_at >= since - 1.0]
            if found and found[-1].ready_at is not None:
                return found[-1]
            time.sleep(0.1)
        raise AssertionError(f"{name} not back within {timeout_s} s: {self.events[-5:]}")


@pytest.fixture(scope="module")
def supervised_stack(tmp_path_factory) -> Iterator[SupervisedStack]:
    # A namespace other than the default: the stack is ready only if the gateway finds its workers there.
    stack = Stack(port=0, log_dir=tmp_path_factory.mktemp("fault-stack"), session_ttl_s=600.0, namespace="fault-suite")
    stack.start(timeout_s=400)
    running = SupervisedStack(stack, None)  # type: ignore[arg-type]

    def report(line: str) -> None:
        running.events.append((time.monotonic(), line))
        print(line, flush=True)

    running.supervisor = stack.supervise(report, backoff_s=0.5)
    try:
        yield running
    finally:
        stack.stop()
