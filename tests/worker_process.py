"""One real `agentkv worker` for a test: the package's launcher with one worker and no gateway."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from agentkv.stack import Stack, Worker, free_port
from kvstore.wire import Paths

ROOT = Path(__file__).resolve().parents[1]


class WorkerProcess(Stack):
    """Spawned at once; `wait_ready()` (or `with`) waits until it is registered in Redis."""

    def __init__(self, redis_url: str, role: str = "both", node_id: str | None = None, port: int | None = None, *extra: str):
        port = port or free_port()
        worker = Worker(role, threads=1, node_id=node_id or f"test-{role}-{port}", port=port, args=extra)
        # No cluster token: the launcher runs it --insecure (unless `extra` passes --cluster-token).
        super().__init__(workers=(worker,), routings=(), redis_url=redis_url, kv_cache_gb=0.25, cluster_token="")
        self.node_id = worker.node_id
        self.child = self.launch().children[0]

    @property
    def url(self) -> str:  # the worker's (a Stack's is its gateway's)
        return next(iter(self.nodes.values()))

    def wait_ready(self, timeout: float = 180) -> None:
        self.start(timeout)

    def health(self) -> dict:
        return httpx.get(self.url + Paths.HEALTH, timeout=5).json()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        return self.child.stop(sig)
