"""`agentkv up`: the whole system on one machine, as child processes of one command.

Embedded Valkey (in this process's care), one prefill worker, one decode worker and the gateway.
With two or more cores each worker is pinned to a core of its own (os.sched_setaffinity in the
child before it starts, one torch thread each), so prefill never steals decode's core: the
disaggregation the design is about, on a laptop. Children run in their own session (a Ctrl-C
reaches only us, and we stop them in order: gateway, workers, Valkey) and get SIGTERM from the
kernel if we die without cleaning up, so no process is ever left behind.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kvstore.valkey import EmbeddedValkey


class StackError(RuntimeError):
    """A part of the stack failed to start; the message includes the tail of its log."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Stack:
    port: int = 8000
    host: str = "127.0.0.1"
    model: str = "smollm2"
    api_keys: str | None = None  # gateway --api-keys spec ("key:tenant,...")
    redis_url: str | None = None  # default: an embedded Valkey
    block_size: int = 16
    kv_cache_gb: float = 0.5
    session_ttl_s: float = 300.0
    log_dir: Path | None = None
    cluster_token: str = field(default_factory=lambda: secrets.token_hex(16))
    children: list[Child] = field(default_factory=list)
    valkey: EmbeddedValkey | None = None
    nodes: dict[str, str] = field(default_factory=dict)  # role -> worker address

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="agentkv-up-"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 300.0) -> Stack:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.redis_url is None:
            self.valkey = EmbeddedValkey().start()
            self.redis_url = self.valkey.url
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pinned = len(cores) >= 2
        for n, role in enumerate(("prefill", "decode")):
            port = free_port()
            self.nodes[role] = f"http://127.0.0.1:{port}"
            args = ["worker", "--role", role, "--port", str(port), "--redis-url", self.redis_url,
                    "--node-id", f"{role}-0", "--model", self.model, "--block-size", str(self.block_size),
                    "--kv-cache-gb", str(self.kv_cache_gb)]  # fmt: skip
            if pinned:
                args += ["--threads", "1"]
            self._spawn(role, args, core=cores[n % len(cores)] if pinned else None)
        gateway = ["gateway", "--host", self.host, "--port", str(self.port), "--redis-url", self.redis_url,
                   "--session-ttl", str(self.session_ttl_s)]  # fmt: skip
        if self.api_keys:
            gateway += ["--api-keys", self.api_keys]
        self._spawn("gateway", gateway, core=None)
        self._wait_ready(timeout_s)

    def _spawn(self, name: str, args: list[str], core: int | None) -> None:
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, "AGENTKV_CLUSTER_TOKEN": self.cluster_token, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "agentkv.cli", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=child_setup(core),
            )  # fmt: skip
        self.children.append(Child(name, process, log))

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the gateway answers and sees both workers (first model load may dequantize: minutes)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                for child in self.children:
                    if child.process.poll() is not None:
                        raise StackError(f"the {child.name} exited at start (code {child.process.returncode}):\n{child.tail()}")
                try:
                    health = client.get(f"{self.url}/health").json()
                    roles = {n["role"] for n in health.get("nodes", [])}
                    if {"prefill", "decode"} <= roles and health.get("ready"):
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.25)
        raise StackError(f"the stack was not ready within {timeout_s:g} s; logs in {self.log_dir}")

    def failed(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self) -> None:
        """Gateway first (no new requests), then the workers (they drain), then Valkey. Idempotent."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None

    def pids(self) -> dict[str, int]:
        out = {c.name: c.process.pid for c in self.children}
        if self.valkey is not None:
            out["valkey"] = self.valkey.pid
        return out

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_up(stack: Stack) -> int:
    """`agentkv up`: start, print the URL, serve until Ctrl-C / SIGTERM (or a child dies), stop."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"agentkv up: starting (logs in {stack.log_dir}) ...", flush=True)
    try:
        stack.start()
    except StackError as exc:
        print(f"agentkv up: error: {exc}", file=sys.stderr, flush=True)
        return 1
    pids = " ".join(f"{name}={pid}" for name, pid in stack.pids().items())
    print(f"agentkv up: ready at {stack.url}/v1  (redis {stack.redis_url}; prefill {stack.nodes['prefill']}; "
          f"decode {stack.nodes['decode']}; logs {stack.log_dir})", flush=True)  # fmt: skip
    print(f"agentkv up: pids {pids}", flush=True)
    print("agentkv up: Ctrl-C stops everything", flush=True)
    code = 0
    while not stop.wait(0.5):
        dead = stack.failed()
        if dead is not None:
            print(f"agentkv up: the {dead.name} exited (code {dead.process.returncode}):\n{dead.tail()}", file=sys.stderr, flush=True)
            code = 1
            break
    print("agentkv up: stopping ...", flush=True)
    stack.stop()
    print("agentkv up: stopped", flush=True)
    return code


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_setup(core: int | None):
    """Runs in the child before exec: pin to `core`, and die with us (PR_SET_PDEATHSIG)."""

    def setup() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup
