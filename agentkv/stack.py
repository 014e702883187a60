"""The one process launcher: `agentkv up`, `agentkv bench agent` and the tests start agentkv with it.

A `Stack` is Valkey (embedded unless given a Redis URL), `agentkv worker`s, each pinned to its own
core before exec so prefill never steals decode's core, and an `agentkv gateway` per routing policy.
Children run in their own session (a Ctrl-C reaches only us, and we stop them in order) and get
SIGTERM from the kernel if we die first, so no process is left behind. `Processes` is the part
without agentkv in it (the bench's peer server uses it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from kvstore.wire import Paths

if TYPE_CHECKING:
    from kvstore.valkey import EmbeddedValkey


class StackError(RuntimeError):
    """A process failed to start or to become ready; the message includes the tail of its log."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Send `sig`, wait, and SIGKILL after `timeout_s`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass(eq=False)
class Processes:
    """Child processes with their logs in `log_dir` (default: a new temporary directory)."""

    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="agentkv-"))

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cpus: tuple[int, ...] = ()) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                                       start_new_session=True, preexec_fn=_child_setup(cpus))  # fmt: skip
        self.children.append(Child(name, process, log))
        return self.children[-1]

    def wait_until(self, ready: Callable[[httpx.Client], bool], what: str, timeout_s: float) -> None:
        """Poll `ready` until it holds; a child that exits meanwhile fails at once, with its log."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if (dead := self.failed()) is not None:
                    raise StackError(f"the {dead.name} exited at start (code {dead.process.returncode}):\n{dead.tail()}")
                try:
                    if ready(client):
                        return
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.25)
        raise StackError(f"{what} not ready within {timeout_s:g} s; logs in {self.log_dir}")

    def failed(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self) -> None:
        """Newest first: gateways before the workers they use, and those drain before Valkey. Idempotent."""
        while self.children:
            self.children.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Worker:
    role: str = "both"  # prefill | decode | both
    cpus: tuple[int, ...] = ()  # pinned to these cores (): not pinned
    threads: int = 0  # torch threads (0: one per allowed core)
    node_id: str = ""  # default: role-k
    port: int = 0  # 0: a free port
    args: tuple[str, ...] = ()  # more `agentkv worker` options


def vllm_python() -> str:
    """The interpreter with vLLM: $AGENTKV_VLLM_PYTHON, else this checkout's .venv-vllm (`make test`
    builds it), else "" (the worker then uses its own)."""
    local = Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"
    return os.environ.get("AGENTKV_VLLM_PYTHON") or (str(local) if local.exists() else "")


def vllm_workers(python: str = "") -> tuple[Worker, ...]:
    """`agentkv up --engine vllm`'s and the bench's pair: a prefill and a decode vLLM worker, one core each."""
    args = ("--engine", "vllm", *(("--vllm-python", python) if python else ()))
    return tuple(dataclasses.replace(w, args=args) for w in one_core_each("prefill", "decode"))


def first_cores(n: int) -> list[int]:
    """The first `n` cores this process may use (fewer on a smaller machine; none where unknown)."""
    return sorted(os.sched_getaffinity(0))[:n] if hasattr(os, "sched_getaffinity") else []


def one_core_each(*roles: str) -> tuple[Worker, ...]:
    """A worker per role, each on a core of its own with one thread (cores are shared when too few)."""
    cores = first_cores(len(roles))
    return tuple(Worker(role, cpus=(cores[n % len(cores)],) if cores else (), threads=1) for n, role in enumerate(roles))


@dataclass(eq=False)
class Stack(Processes):
    """Valkey, `workers` and a gateway per routing policy; `start()` returns when every gateway sees
    every worker (a first model load dequantizes: minutes)."""

    workers: tuple[Worker, ...] = field(default_factory=lambda: one_core_each("prefill", "decode"))
    routings: tuple[str, ...] = ("prefix",)
    port: int = 8000  # the first gateway's (0: a free port)
    host: str = "127.0.0.1"
    model: str = "smollm2"
    api_keys: str = ""  # the gateway's --api-keys ("key:tenant,...")
    redis_url: str = ""  # "": an embedded Valkey
    block_size: int = 16
    kv_cache_gb: float = 0.5
    session_ttl_s: float = 300.0
    start_timeout_s: float = 300.0  # vLLM workers: 35-100 s each on a loaded 2-core machine; give them more
    cluster_token: str = field(default_factory=lambda: secrets.token_hex(16))  # "": none
    valkey: EmbeddedValkey | None = None  # the one we started
    nodes: dict[str, str] = field(default_factory=dict)  # worker name -> internal API URL
    urls: dict[str, str] = field(default_factory=dict)  # routing policy -> gateway URL

    @property
    def url(self) -> str:
        return next(iter(self.urls.values()), "")

    def launch(self) -> Stack:
        """Spawn everything without waiting for it (`start()` waits)."""
        if not self.redis_url:
            from kvstore.valkey import EmbeddedValkey

            self.valkey = EmbeddedValkey().start()
            self.redis_url = self.valkey.url
        env = {"AGENTKV_CLUSTER_TOKEN": self.cluster_token} if self.cluster_token else {}
        cli = [sys.executable, "-m", "agentkv.cli"]
        roles = [w.role for w in self.workers]
        for n, w in enumerate(self.workers):
            node_id, port = w.node_id or f"{w.role}-{roles[:n].count(w.role)}", w.port or free_port()
            name = w.role if roles.count(w.role) == 1 else node_id
            argv = [*cli, "worker", "--role", w.role, "--port", str(port), "--redis-url", self.redis_url, "--node-id", node_id,
                    "--model", self.model, "--block-size", str(self.block_size), "--kv-cache-gb", str(self.kv_cache_gb),
                    "--threads", str(w.threads), *w.args]  # fmt: skip
            self.spawn(name, argv, env=env, cpus=w.cpus)
            self.nodes[name] = f"http://127.0.0.1:{port}"
        routings = list(dict.fromkeys(self.routings))
        for n, routing in enumerate(routings):
            port = (n == 0 and self.port) or free_port()
            argv = [*cli, "gateway", "--host", self.host, "--port", str(port), "--redis-url", self.redis_url,
                    "--session-ttl", str(self.session_ttl_s), "--routing", routing, "--api-keys", self.api_keys]  # fmt: skip
            name = "gateway" if len(routings) == 1 else f"gateway-{routing}"
            self.spawn(name, argv, env=env)
            self.urls[routing] = f"http://{self.host}:{port}"
        return self

    def start(self, timeout_s: float | None = None) -> Stack:
        try:
            if not self.children:
                self.launch()
            self.wait_until(self._ready, "the stack", timeout_s or self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self, http: httpx.Client) -> bool:
        workers = all(http.get(url + Paths.HEALTH).json().get("redis_connected") for url in self.nodes.values())
        gateways = (http.get(f"{url}/health").json() for url in self.urls.values())
        return workers and all(h.get("ready") and len(h.get("nodes", [])) >= len(self.workers) for h in gateways)

    def stop(self) -> None:
        super().stop()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey, self.redis_url = None, ""

    def pids(self) -> dict[str, int]:
        return {**({"valkey": self.valkey.pid} if self.valkey else {}), **{c.name: c.process.pid for c in self.children}}

    def __enter__(self) -> Stack:
        return self.start()


def run_up(stack: Stack) -> int:
    """`agentkv up`: start, print where everything is, serve until Ctrl-C / SIGTERM or a child dies."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C even where a shell started us ignoring SIGINT
        signal.signal(sig, signal.default_int_handler)
    print(f"agentkv up: starting (logs in {stack.log_dir}) ...", flush=True)
    try:
        stack.start()
        nodes = "; ".join(f"{name} {url}" for name, url in stack.nodes.items())
        pids = " ".join(f"{name}={pid}" for name, pid in stack.pids().items())
        print(f"agentkv up: ready at {stack.url}/v1  (redis {stack.redis_url}; {nodes}; logs {stack.log_dir})\n"
              f"agentkv up: pids {pids}\nagentkv up: Ctrl-C stops everything", flush=True)  # fmt: skip
        while (dead := stack.failed()) is None:
            time.sleep(0.5)
        print(f"agentkv up: the {dead.name} exited (code {dead.process.returncode}):\n{dead.tail()}", file=sys.stderr, flush=True)
        code = 1
    except StackError as exc:
        print(f"agentkv up: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        code = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stopping short
    print("agentkv up: stopping ...", flush=True)
    stack.stop()
    print("agentkv up: stopped", flush=True)
    return code


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def _child_setup(cpus: tuple[int, ...]) -> Callable[[], None]:
    """Runs in the child before exec: pin to `cpus`, and die with us (PR_SET_PDEATHSIG)."""

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)

    return setup
