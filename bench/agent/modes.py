"""The systems under test, and how each is started on this machine.

Every mode is a system (agentkv or the peer), a topology (which workers, on which cores), a
routing policy and a workload. Topologies share the machine's first two cores so every mode gets
the same hardware:

    pair           two workers in role `both`, one core each: prefill and decode share each core.
                   The three routing policies run here, and so does the colocated side of the
                   head-of-line comparison
    disaggregated  a prefill worker on one core, a decode worker on the other
    peer           `transformers serve --continuous-batching`, both cores, two threads, same weights

One thread per worker keeps the comparison fair on a shared machine: a two-thread worker stalls
at every parallel region whenever another process holds one of its cores.

A topology's workers start once, with one gateway per routing policy in front of them. Modes
that share workers never share cache entries: each run's prompts start with their own nonce
(workload.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from agentkv.stack import Child, StackError, child_setup, free_port
from kvstore.valkey import EmbeddedValkey

Routing = Literal["prefix", "sticky", "round_robin"]


@dataclass(frozen=True)
class WorkerSpec:
    role: str
    cpus: tuple[int, ...]
    threads: int


@dataclass(frozen=True)
class Mode:
    name: str
    system: Literal["agentkv", "transformers_serve"]
    topology: str
    routing: Routing | None
    workload: Literal["agent", "hol_mix"]


MODES = (
    Mode("round_robin", "agentkv", "pair", "round_robin", "agent"),
    Mode("sticky", "agentkv", "pair", "sticky", "agent"),
    Mode("prefix_aware", "agentkv", "pair", "prefix", "agent"),
    Mode("colocated", "agentkv", "pair", "prefix", "hol_mix"),
    Mode("disaggregated", "agentkv", "disaggregated", "prefix", "hol_mix"),
    Mode("transformers_serve", "transformers_serve", "peer", None, "agent"),
)


def two_cores() -> tuple[int, int]:
    """The first two cores this process may use (the same one twice on a one-core machine)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return cores[0], cores[min(1, len(cores) - 1)]


def topologies() -> dict[str, tuple[WorkerSpec, ...]]:
    a, b = two_cores()
    return {
        "pair": (WorkerSpec("both", (a,), 1), WorkerSpec("both", (b,), 1)),
        "disaggregated": (WorkerSpec("prefill", (a,), 1), WorkerSpec("decode", (b,), 1)),
        "peer": (),
    }


def kv_bytes_per_block(model: str, block_size: int) -> int:
    """KV bytes of one block as the workers store it: layers x (K, V) x tokens x heads x dim x dtype."""
    from transformers import AutoConfig

    from workers.loader import default_device, default_dtype, resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model)[0])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = default_dtype(default_device()).itemsize
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * head_dim * itemsize


@dataclass
class Processes:
    """Child processes with logs; each dies with us (PR_SET_PDEATHSIG) and is stopped in reverse order."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cpus: tuple[int, ...] = ()) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        die_with_parent = child_setup(None)

        def setup() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            die_with_parent()

        with open(log, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                                       start_new_session=True, preexec_fn=setup)  # fmt: skip
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def wait_until(self, ready: Callable[[httpx.Client], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                for child in self.children:
                    if child.process.poll() is not None:
                        raise StackError(f"{child.name} exited at start (code {child.process.returncode}):\n{child.tail()}")
                try:
                    if ready(client):
                        return
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.25)
        raise StackError(f"{what} not ready within {timeout_s:g} s; logs in {self.log_dir}")

    def stop(self, child: Child) -> None:
        if child.process.poll() is None:
            child.process.terminate()
        try:
            child.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


class AgentkvCluster:
    """Valkey, one topology's workers and one gateway per routing policy, all started at once.

    The gateways share the workers (and the index); each mode talks to its own gateway, so
    switching policy costs nothing and no gateway restarts between modes.
    """

    def __init__(self, workers: tuple[WorkerSpec, ...], routings: list[Routing], log_dir: Path, *, model: str = "smollm2",
                 block_size: int = 16, kv_cache_gb: float = 1.0, session_ttl_s: float = 120.0) -> None:  # fmt: skip
        self.workers = workers
        self.routings = list(dict.fromkeys(routings))
        self.model = model
        self.block_size = block_size
        self.kv_cache_gb = kv_cache_gb
        self.session_ttl_s = session_ttl_s
        self.procs = Processes(log_dir)
        self.env = {"AGENTKV_CLUSTER_TOKEN": secrets.token_hex(16)}
        self.valkey: EmbeddedValkey | None = None
        self.urls: dict[str, str] = {}  # routing policy -> gateway base URL

    def start(self, timeout_s: float = 300.0) -> AgentkvCluster:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        self.valkey = EmbeddedValkey().start()
        cli = [sys.executable, "-m", "agentkv.cli"]
        for n, spec in enumerate(self.workers):
            self.procs.spawn(f"{spec.role}-{n}", [
                *cli, "worker", "--role", spec.role, "--port", str(free_port()), "--redis-url", self.valkey.url,
                "--node-id", f"{spec.role}-{n}", "--model", self.model, "--block-size", str(self.block_size),
                "--kv-cache-gb", str(self.kv_cache_gb), "--threads", str(spec.threads), "--cpus", ",".join(map(str, spec.cpus)),
            ], self.env)  # fmt: skip
        for routing in self.routings:
            port = free_port()
            self.procs.spawn(f"gateway-{routing}", [
                *cli, "gateway", "--host", "127.0.0.1", "--port", str(port), "--redis-url", self.valkey.url,
                "--session-ttl", str(self.session_ttl_s), "--routing", routing,
            ], self.env)  # fmt: skip
            self.urls[routing] = f"http://127.0.0.1:{port}"
        want = len(self.workers)

        def ready(client: httpx.Client) -> bool:
            for url in self.urls.values():
                health = client.get(f"{url}/health").json()
                if not health.get("ready") or len(health.get("nodes", [])) < want:
                    return False
            return True

        self.procs.wait_until(ready, "the workers and gateways", timeout_s)

    def stop(self) -> None:
        self.procs.stop_all()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None

    def __enter__(self) -> AgentkvCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TransformersServe:
    """`transformers serve --continuous-batching` on the same weights (the dequantized safetensors
    directory: it cannot serve the GGUF) with the same cores and thread count.

    Its KV cache is bounded to `kv_cache_gb` like our workers' pools: left alone it sizes the cache
    from free memory, which on a CPU host means most of the machine's RAM.
    """

    PAGE_TOKENS = 256  # transformers' continuous-batching block ("page") size

    def __init__(self, model_dir: Path, cpus: tuple[int, ...], log_dir: Path, *, kv_cache_gb: float = 1.0,
                 kv_bytes_per_token: int = 0) -> None:  # fmt: skip
        self.model_dir = model_dir
        self.cpus = cpus
        self.procs = Processes(log_dir)
        self.num_blocks = max(16, int(kv_cache_gb * 2**30 // (self.PAGE_TOKENS * kv_bytes_per_token))) if kv_bytes_per_token else None
        self.url = ""

    def start(self, timeout_s: float = 300.0) -> TransformersServe:
        exe = Path(sys.executable).with_name("transformers")
        exe = str(exe) if exe.exists() else shutil.which("transformers")
        if exe is None:
            raise StackError("the `transformers` command is missing: install transformers[serving]")
        port = free_port()
        threads = str(len(self.cpus))
        self.procs.spawn("transformers-serve", [
            exe, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            *(["--cb-num-blocks", str(self.num_blocks)] if self.num_blocks else []), str(self.model_dir),
        ], {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, self.cpus)  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.procs.wait_until(lambda c: c.get(f"{self.url}/health").status_code == 200, "transformers serve", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.procs.stop_all()

    def __enter__(self) -> TransformersServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
