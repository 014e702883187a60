"""Start and stop real `agentkv worker` processes for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    def __init__(self, redis_url: str, role: str = "both", node_id: str | None = None, port: int | None = None, *extra: str):
        self.port = port or free_port()
        self.node_id = node_id or f"test-{role}-{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"agentkv-worker-{self.port}.log"
        cmd = [
            sys.executable, "-m", "agentkv.cli", "worker", "--redis-url", redis_url, "--role", role,
            "--port", str(self.port), "--node-id", self.node_id, "--kv-cache-gb", "0.25", "--threads", "1", *extra,
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = httpx.get(f"{self.url}/internal/health", timeout=2).json()
                if health.get("redis_connected"):
                    return health
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/internal/health", timeout=5).json()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._log.close()

    def __enter__(self) -> WorkerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGTERM)
