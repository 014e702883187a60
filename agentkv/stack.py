"""The one process launcher: `agentkv up`, `agentkv bench agent` and the tests start agentkv with it.

A `Stack` is Valkey (embedded unless given a Redis URL), `agentkv worker`s, each pinned to its own
core before exec so prefill never steals decode's core, and an `agentkv gateway` per routing policy.
Children run in their own session (a Ctrl-C reaches only us, and we stop them in order) and get
SIGTERM from the kernel if we die first, so no process is left behind. `Processes` is the part
without agentkv in it (the bench's peer server uses it).

A `Supervisor` keeps a started stack up: a child that dies (or the embedded Valkey) is restarted
with exponential backoff, one line per event, while the others serve on (docs/failure-modes.md).
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
import threading
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
    argv: list[str] = field(default_factory=list)  # how to start it again
    env: dict[str, str] = field(default_factory=dict)
    cpus: tuple[int, ...] = ()
    kind: str = ""  # children of one kind stop together ("": each its own)
    ready_url: str = ""  # answers 200 with {"ready": true} or {"redis_connected": true} once it serves
    started_at: float = field(default_factory=time.monotonic)

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

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cpus: tuple[int, ...] = (),
              kind: str = "", ready_url: str = "") -> Child:  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        child = Child(name, _popen(argv, env or {}, cpus, log, "wb"), log, argv, env or {}, cpus, kind, ready_url)
        self.children.append(child)
        return child

    def respawn(self, child: Child) -> Child:
        """Start a child that exited again, same command, its log appended to."""
        child.process = _popen(child.argv, child.env, child.cpus, child.log, "ab")
        child.started_at = time.monotonic()
        return child

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

    def stop(self, grace_s: float = 15.0) -> None:
        """Newest first, a kind at a time (all its children together): gateways before the workers they
        use, and those drain before Valkey; SIGKILL after `grace_s`. Idempotent."""
        while self.children:
            kind = self.children[-1].kind
            group = [self.children.pop()]
            while kind and self.children and self.children[-1].kind == kind:
                group.append(self.children.pop())
            for child in group:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in group:
                child.stop(timeout_s=max(0.0, deadline - time.monotonic()))

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


def vllm_workers(python: str = "", roles: tuple[str, ...] = ("prefill", "decode")) -> tuple[Worker, ...]:
    """`agentkv up --engine vllm`'s and the bench's pairs: a vLLM worker per role (default a prefill and a
    decode one), one core each."""
    args = ("--engine", "vllm", *(("--vllm-python", python) if python else ()))
    return tuple(dataclasses.replace(w, args=args) for w in one_core_each(*roles))


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
    api_keys: str = ""  # the gateway's API keys ("key:tenant,..." or "@file"; passed in its environment, not argv)
    redis_url: str = ""  # "": an embedded Valkey (durable: its append-only file in log_dir/valkey)
    namespace: str = "akv"  # Redis key prefix shared by the gateways and workers
    block_size: int = 16
    kv_cache_gb: float = 0.5
    session_ttl_s: float = 300.0
    start_timeout_s: float = 300.0  # vLLM workers: 35-100 s each on a loaded 2-core machine; give them more
    cluster_token: str = field(default_factory=lambda: secrets.token_hex(16))  # "": none (workers run --insecure)
    valkey: EmbeddedValkey | None = None  # the one we started
    nodes: dict[str, str] = field(default_factory=dict)  # worker name -> internal API URL
    urls: dict[str, str] = field(default_factory=dict)  # routing policy -> gateway URL
    supervisor: Supervisor | None = field(default=None, repr=False)  # supervise()'s

    @property
    def url(self) -> str:
        return next(iter(self.urls.values()), "")

    def launch(self) -> Stack:
        """Spawn everything without waiting for it (`start()` waits)."""
        if not self.redis_url:
            from kvstore.valkey import EmbeddedValkey

            self.valkey = EmbeddedValkey(data_dir=self.log_dir / "valkey").start()
            self.redis_url = self.valkey.url
        # Secrets go in the environment (readable only by this user), never argv (anyone's `ps`).
        env = {"AGENTKV_CLUSTER_TOKEN": self.cluster_token} if self.cluster_token else {}
        cli = [sys.executable, "-m", "agentkv.cli"]
        roles = [w.role for w in self.workers]
        for n, w in enumerate(self.workers):
            node_id, port = w.node_id or f"{w.role}-{roles[:n].count(w.role)}", w.port or free_port()
            name = w.role if roles.count(w.role) == 1 else node_id
            insecure = () if self.cluster_token or "--cluster-token" in w.args else ("--insecure",)
            argv = [*cli, "worker", "--role", w.role, "--port", str(port), "--redis-url", self.redis_url, "--node-id", node_id,
                    "--model", self.model, "--block-size", str(self.block_size), "--kv-cache-gb", str(self.kv_cache_gb),
                    "--threads", str(w.threads), "--namespace", self.namespace, *insecure, *w.args]  # fmt: skip
            self.nodes[name] = f"http://127.0.0.1:{port}"
            self.spawn(name, argv, env=env, cpus=w.cpus, kind="worker", ready_url=self.nodes[name] + Paths.HEALTH)
        routings = list(dict.fromkeys(self.routings))
        for n, routing in enumerate(routings):
            port = (n == 0 and self.port) or free_port()
            argv = [*cli, "gateway", "--host", self.host, "--port", str(port), "--redis-url", self.redis_url,
                    "--session-ttl", str(self.session_ttl_s), "--routing", routing, "--namespace", self.namespace]  # fmt: skip
            name = "gateway" if len(routings) == 1 else f"gateway-{routing}"
            self.urls[routing] = f"http://{self.host}:{port}"
            self.spawn(name, argv, env={**env, "AGENTKV_API_KEYS": self.api_keys}, kind="gateway",
                       ready_url=f"{self.urls[routing]}/health")  # fmt: skip
        return self

    def start(self, timeout_s: float | None = None) -> Stack:
        try:
            if not self.children:
                self.launch()
            self.wait_until(self._ready, "the stack", timeout_s or self.start_timeout_s)
        except BaseException:
            self.stop(grace_s=3.0)  # nothing serves yet: a Ctrl-C during start-up is not kept waiting
            raise
        return self

    def _ready(self, http: httpx.Client) -> bool:
        workers = all(http.get(url + Paths.HEALTH).json().get("redis_connected") for url in self.nodes.values())
        gateways = (http.get(f"{url}/health").json() for url in self.urls.values())
        return workers and all(h.get("ready") and _node_count(h) >= len(self.workers) for h in gateways)

    def supervise(self, report: Callable[[str], None] = print, **policy: float) -> Supervisor:
        """Keep the started stack up from a background thread until `stop()` (`run_up` supervises on
        the main thread instead, so that Ctrl-C reaches it)."""
        supervisor = self.supervisor = Supervisor(self, report, **policy)
        supervisor.run_in_background()
        return supervisor

    def stop(self, grace_s: float = 15.0) -> None:
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None and supervisor.stop_background(grace_s):
            return  # its thread stopped everything (children it restarted die with it: PR_SET_PDEATHSIG)
        super().stop(grace_s)
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey, self.redis_url = None, ""

    def pids(self) -> dict[str, int]:
        return {**({"valkey": self.valkey.pid} if self.valkey else {}), **{c.name: c.process.pid for c in self.children}}

    def __enter__(self) -> Stack:
        return self.start()


@dataclass
class Outage:
    """One child's death and recovery, as the supervisor saw it (monotonic seconds)."""

    name: str
    exit_code: int
    died_at: float
    restart_in_s: float
    restarted_at: float | None = None
    ready_at: float | None = None

    @property
    def recovery_s(self) -> float | None:
        """From noticing the death to serving again."""
        return None if self.ready_at is None else self.ready_at - self.died_at


class Supervisor:
    """Restarts whatever of a started `Stack` dies: the embedded Valkey (with its data, after
    `valkey_backoff_s`) and any worker or gateway, after `backoff_s` doubling per quick death up to
    `max_backoff_s` (a child that ran `stable_s` starts over at `backoff_s`). Each event is one line
    to `report`; `outages` keeps the figures (the fault suite asserts on them)."""

    def __init__(self, stack: Stack, report: Callable[[str], None] = print, *, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0, valkey_backoff_s: float = 0.25):  # fmt: skip
        self.stack, self.report = stack, report
        self.backoff_s, self.max_backoff_s, self.stable_s, self.valkey_backoff_s = backoff_s, max_backoff_s, stable_s, valkey_backoff_s
        self.outages: list[Outage] = []
        self._open: dict[str, Outage] = {}  # name -> the outage not yet over
        self._deaths: dict[str, int] = {}  # name -> quick deaths in a row
        self._thread: threading.Thread | None = None
        self._grace_s = 15.0
        self._stopping = threading.Event()
        self._http = httpx.Client(timeout=1.0)

    def poll(self) -> None:
        """One pass: notice deaths, restart what is due, notice what serves again."""
        now = time.monotonic()
        valkey = self.stack.valkey
        if valkey is not None and (code := valkey.exit_code()) is not None and "valkey" not in self._open:
            self._died("valkey", code, self.valkey_backoff_s, "with its data" if valkey.durable else "EMPTY: not durable")
        for child in self.stack.children:
            if child.name not in self._open and (code := child.process.poll()) is not None:
                quick = now - child.started_at < self.stable_s
                deaths = self._deaths[child.name] = self._deaths.get(child.name, 0) + 1 if quick else 1
                self._died(child.name, code, min(self.backoff_s * 2 ** (deaths - 1), self.max_backoff_s))
        for name, outage in list(self._open.items()):
            if outage.restarted_at is None and now >= outage.died_at + outage.restart_in_s:
                self._restart(name, outage)
            elif outage.restarted_at is not None and self._serves(name):
                outage.ready_at = time.monotonic()
                del self._open[name]
                self.report(f"agentkv up: {name} is back ({outage.recovery_s:.1f} s after it died)")

    def _died(self, name: str, code: int, delay_s: float, note: str = "") -> None:
        outage = Outage(name, code, time.monotonic(), delay_s)
        self.outages.append(outage)
        self._open[name] = outage
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
        self.report(f"agentkv up: {name} exited ({how}); restarting in {delay_s:g} s{f' ({note})' if note else ''}")

    def _restart(self, name: str, outage: Outage) -> None:
        try:
            if name == "valkey":
                self.stack.valkey.restart()
                pid = self.stack.valkey.pid
            else:
                pid = self.stack.respawn(next(c for c in self.stack.children if c.name == name)).process.pid
        except Exception as exc:  # noqa: BLE001 - a failed restart is retried, never the supervisor's end
            outage.died_at, outage.restart_in_s = time.monotonic(), min(max(outage.restart_in_s * 2, 1.0), self.max_backoff_s)
            self.report(f"agentkv up: {name} could not be restarted ({exc}); again in {outage.restart_in_s:g} s")
            return
        outage.restarted_at = time.monotonic()
        self.report(f"agentkv up: {name} restarted (pid {pid})")

    def _serves(self, name: str) -> bool:
        if name == "valkey":
            return True  # restart() returns once it answers
        child = next(c for c in self.stack.children if c.name == name)
        if child.process.poll() is not None:
            return False  # died again: the next pass notices
        try:
            health = self._http.get(child.ready_url).json() if child.ready_url else {"ready": True}
        except (httpx.HTTPError, ValueError):
            return False
        return bool(health.get("ready") or health.get("redis_connected"))

    def healthy(self) -> bool:
        """Nothing is down or restarting."""
        return not self._open

    def run_in_background(self, interval_s: float = 0.2) -> None:
        def loop() -> None:
            while not self._stopping.wait(interval_s):
                self.poll()
            try:
                Stack.stop(self.stack, self._grace_s)  # from this thread: what it restarted dies with it
            finally:
                self._http.close()

        self._thread = threading.Thread(target=loop, name="agentkv-supervisor", daemon=True)
        self._thread.start()

    def stop_background(self, grace_s: float) -> bool:
        """Stop the background loop, which stops the stack; False if there is none (or we are it)."""
        if self._thread is None or self._thread is threading.current_thread():
            return False
        self._grace_s = grace_s
        self._stopping.set()
        self._thread.join()
        return True


def run_up(stack: Stack) -> int:
    """`agentkv up`: start, print where everything is, supervise until Ctrl-C / SIGTERM."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C even where a shell started us ignoring SIGINT
        signal.signal(sig, signal.default_int_handler)
    print(f"agentkv up: starting (logs in {stack.log_dir}) ...", flush=True)
    try:
        stack.start()
        nodes = "; ".join(f"{name} {url}" for name, url in stack.nodes.items())
        pids = " ".join(f"{name}={pid}" for name, pid in stack.pids().items())
        print(f"agentkv up: ready at {stack.url}/v1  (redis {stack.redis_url}; {nodes}; logs {stack.log_dir})\n"
              f"agentkv up: pids {pids}\nagentkv up: Ctrl-C stops everything", flush=True)  # fmt: skip
        supervisor = Supervisor(stack, lambda line: print(line, flush=True))
        while True:
            supervisor.poll()
            time.sleep(0.25)
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


def _node_count(health: dict) -> int:
    """Nodes a gateway's /health reports: its list, or only a count where keys keep it minimal."""
    return int(health["node_count"]) if "node_count" in health else len(health.get("nodes", []))


def _popen(argv: list[str], env: dict[str, str], cpus: tuple[int, ...], log: Path, mode: str) -> subprocess.Popen:
    with open(log, mode) as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True, preexec_fn=_child_setup(cpus))  # fmt: skip


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
