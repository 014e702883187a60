"""The vLLM column of `agentkv bench engine`: vLLM's CPU build measured the way the built-in engine is.

One vLLM OpenAI server, as a user would run it next to agentkv: fp32 (our engine's dtype), eager,
blocks of 32 (its CPU attention's size), prefix caching off (every prompt is distinct anyway), a KV
cache that holds the largest batch, and otherwise vLLM's defaults (its chunked-prefill token budget
included: read back from its log). Its model-executing worker process is pinned to `core` with one
OpenMP thread; the API frontend and vLLM's scheduler process (EngineCore) run on the remaining
cores, which is vLLM's own split (it reserves a core for them), and so does this client.

Requests are streamed `/v1/completions` with token-id prompts, `ignore_eos`, greedy, and
`return_token_ids` so every chunk says how many tokens it carries. Timing is client-side
(`time.perf_counter` at each chunk's arrival).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from agentkv.stack import Processes, StackError

ITL_CONTEXT = 256  # the decoding streams' prompt length in the ITL measurement
ITL_TOKENS = 96  # their max_tokens: outlasts the alone window plus the long prefill
ITL_ALONE_TOKENS = 32  # tokens per stream measured with no other traffic before the long prompt goes in
START_TIMEOUT_S = 600.0  # first start on a loaded 2-core machine: 35-100 s seen


@dataclass
class Stream:
    """One streamed completion: when it was sent, and each token chunk's arrival time and size."""

    sent: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)

    @property
    def first(self) -> float:
        return self.chunks[0][0]

    @property
    def last(self) -> float:
        return self.chunks[-1][0]

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of each interval between consecutive token chunks."""
        return [(a, b) for (a, _), (b, _) in zip(self.chunks, self.chunks[1:], strict=False)]


def measure_vllm(python: str, model_dir: Path, *, core: int, log_dir: Path, batches=(1, 8, 32), context: int = 1024,
                 new_tokens: int = 32, long_prompt: int = 2048, itl_batch: int = 8, block_size: int = 32,
                 prompts: Callable[[int, int, int], list[list[int]]]) -> dict:  # fmt: skip
    """Decode tok/s per batch, prefill tok/s of a `long_prompt`-token prompt, and the ITL of
    `itl_batch` decoding streams alone and while that prompt is prefilled, all from one server."""
    cores = sorted(os.sched_getaffinity(0))
    frontend = tuple(c for c in cores if c != core) or (core,)
    max_model_len = max(long_prompt + new_tokens, context + new_tokens, ITL_CONTEXT + ITL_TOKENS)
    kv_bytes = _kv_cache_bytes(model_dir, block_size, max(batches) * (context + new_tokens),
                               itl_batch * (ITL_CONTEXT + ITL_TOKENS) + long_prompt + 1)  # fmt: skip
    with vllm_bench_server(python, model_dir, log_dir, core=core, frontend=frontend, block_size=block_size,
                           kv_cache_bytes=kv_bytes, max_model_len=max_model_len) as server:  # fmt: skip
        client = _Client(server.url, str(model_dir))
        figures = _run_pinned(frontend, _measure(client, batches, context, new_tokens, long_prompt, itl_batch, prompts))
        version = httpx.get(f"{server.url}/version", timeout=10).json().get("version", "")
        scheduler = server.scheduler_config()
    return {
        "engine": "vllm", "version": version, "dtype": "float32", **figures,
        "settings": {"core": core, "frontend_cores": list(frontend), **scheduler,
                     "block_size": block_size, "context": context, "new_tokens": new_tokens, "long_prompt": long_prompt,
                     "itl_batch": itl_batch, "itl_context": ITL_CONTEXT, "itl_alone_tokens": ITL_ALONE_TOKENS,
                     "max_model_len": max_model_len, "kv_cache_bytes": kv_bytes, "prefix_caching": False,
                     "enforce_eager": True, "omp_threads": 1, "server_pgid": server.pgid, "pinned": server.pinned,
                     "pinning": "vLLM's worker process on `core`; its API frontend, EngineCore scheduler and this "
                                "client on `frontend_cores`"},
    }  # fmt: skip


# --- the server ---------------------------------------------------------------------------------


@dataclass
class BenchServer:
    url: str
    pgid: int
    pinned: dict[str, list[int]]  # "name pid" -> cores, as pinned once it served

    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler settings vLLM runs with (its chunked-prefill token budget is a default it
        derives, logged only at debug level): read back from its dev-mode `/server_info`."""
        info = httpx.get(f"{self.url}/server_info", params={"config_format": "json"}, timeout=60).json()
        scheduler = info["vllm_config"]["scheduler_config"]
        return {k: scheduler.get(k) for k in ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill")}


@contextmanager
def vllm_bench_server(python: str, model_dir: Path, log_dir: Path, *, core: int, frontend: tuple[int, ...], block_size: int,
                      kv_cache_bytes: int, max_model_len: int, timeout_s: float = START_TIMEOUT_S):  # fmt: skip
    """Start the server, pin its processes once it serves, yield a BenchServer; always stop the
    whole process group (its EngineCore and worker are children of the API server)."""
    if not python or not Path(python).exists():
        raise StackError("no vLLM interpreter: set AGENTKV_VLLM_PYTHON or build .venv-vllm (make test does)")
    from workers.vllm_server import spare_port

    port = spare_port()
    argv = ["env", "-u", "VLLM_CPU_KVCACHE_SPACE",  # it would override --kv-cache-memory-bytes
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--block-size", str(block_size), "--kv-cache-memory-bytes",
            str(kv_cache_bytes), "--max-model-len", str(max_model_len), "--no-enable-prefix-caching", "--enforce-eager"]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": "1",
           "VLLM_SERVER_DEV_MODE": "1"}  # for /server_info only; loopback, no other effect on serving
    procs = Processes(log_dir)
    try:
        child = procs.spawn("vllm-bench", argv, env=env, cpus=tuple(sorted({core, *frontend})))
        url = f"http://127.0.0.1:{port}"
        procs.wait_until(lambda http: http.get(f"{url}/health").status_code == 200, "vLLM", timeout_s)
        pinned = _pin_group(child.process.pid, core, frontend)
        yield BenchServer(url, child.process.pid, pinned)
    finally:
        pgid = procs.children[0].process.pid if procs.children else None
        procs.stop(grace_s=10.0)
        if pgid is not None:
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, 10.0)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (zombies excluded)."""
    return any(state != "Z" for _, state, _ in _group(pgid))


def _group(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, state, name) of every process whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                members.append((int(entry.name), fields[0], name))
    return members


def _pin_group(pgid: int, core: int, frontend: tuple[int, ...]) -> dict[str, list[int]]:
    """vLLM's worker process (it runs the model) on `core`, every other process of the server on
    `frontend`; every thread of each, since affinity is per thread. Returns what was pinned where."""
    pinned = {}
    for pid, _, name in _group(pgid):
        cpus = {core} if "Worker" in name else set(frontend)
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):
                os.sched_setaffinity(int(task.name), cpus)
        pinned[f"{name} {pid}"] = sorted(cpus)
    if not any("Worker" in name for name in pinned):
        raise StackError(f"no vLLM worker process found to pin to core {core}: {sorted(pinned)}")
    return pinned


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _kv_cache_bytes(model_dir: Path, block_size: int, *token_needs: int) -> int:
    """fp32 KV bytes for the largest of `token_needs` tokens, plus a block per sequence of rounding and 10%."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * 2 * config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim * 4
    tokens = max(token_needs) + 64 * block_size
    return int(math.ceil(tokens / block_size) * block_size * per_token * 1.1)


# --- the client -----------------------------------------------------------------------------------


class _Client:
    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model

    async def stream(self, http: httpx.AsyncClient, prompt: list[int], max_tokens: int, into: Stream) -> Stream:
        """Send one streamed completion and record each token chunk's arrival into `into`."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}  # fmt: skip
        into.sent = time.perf_counter()
        async with aconnect_sse(http, "POST", f"{self.url}/v1/completions", json=body) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                raise RuntimeError(f"vLLM answered {source.response.status_code}: {source.response.text[:500]}")
            async for event in source.aiter_sse():
                if event.data == "[DONE]":
                    break
                now = time.perf_counter()
                choice = (json.loads(event.data).get("choices") or [{}])[0]
                if n := len(choice.get("token_ids") or ()):
                    into.chunks.append((now, n))
        if sum(n for _, n in into.chunks) != max_tokens:
            raise RuntimeError(f"vLLM streamed {sum(n for _, n in into.chunks)} tokens, {max_tokens} asked")
        return into


async def _measure(client: _Client, batches, context: int, new_tokens: int, long_prompt: int, itl_batch: int,
                   prompts: Callable[[int, int, int], list[list[int]]]) -> dict[str, Any]:  # fmt: skip
    most = max(*batches, itl_batch) + 8
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
        # warm-up: the first requests pay one-time costs (allocations, first kernels) that later ones do not
        await asyncio.gather(*(client.stream(http, p, 4, Stream()) for p in prompts(2, context, 10_000)))
        decode, full_batch = {}, {}
        for b in batches:
            streams = await asyncio.gather(*(client.stream(http, p, new_tokens, Stream()) for p in prompts(b, context, 20_000 + b)))
            decode[str(b)], full_batch[str(b)] = decode_rates(streams)
        ttfts = []
        for prompt in prompts(3, long_prompt, 30_000):
            done = await client.stream(http, prompt, 1, Stream())
            ttfts.append(done.first - done.sent)
        ttft = statistics.median(ttfts)
        itl = await _itl_under_prefill(client, http, itl_batch, long_prompt, prompts)
    return {"decode_tok_s": decode, "prefill_tok_s": long_prompt / ttft, "ttft_2048_s": ttft, **itl,
            "decode_full_batch_tok_s": full_batch, "ttft_runs_s": ttfts}  # fmt: skip


def decode_rates(streams: list[Stream]) -> tuple[float, float]:
    """Decode tok/s once every stream has its first token (prefill excluded): (up to the last
    token, up to the first stream's end, i.e. while the whole batch decodes)."""
    all_started = max(s.first for s in streams)
    last, first_done = max(s.last for s in streams), min(s.last for s in streams)

    def rate(end: float) -> float:
        tokens = sum(n for s in streams for t, n in s.chunks if all_started < t <= end)
        return tokens / (end - all_started) if end > all_started else math.nan

    return rate(last), rate(first_done)


async def _itl_under_prefill(client: _Client, http: httpx.AsyncClient, itl_batch: int, long_prompt: int,
                             prompts: Callable[[int, int, int], list[list[int]]]) -> dict[str, Any]:  # fmt: skip
    """`itl_batch` streams decode; gaps with no other traffic, then while one `long_prompt` prompt
    is prefilled (every gap that overlaps the time from its submission to its first token)."""
    streams = [Stream() for _ in range(itl_batch)]
    tasks = [asyncio.create_task(client.stream(http, p, ITL_TOKENS, s))
             for p, s in zip(prompts(itl_batch, ITL_CONTEXT, 40_000), streams, strict=True)]  # fmt: skip
    try:
        while not all(s.chunks for s in streams):
            await _still_running(tasks)
        all_started = max(s.first for s in streams)
        while min(sum(n for t, n in s.chunks if t > all_started) for s in streams) < ITL_ALONE_TOKENS:
            await _still_running(tasks)
        (long,) = prompts(1, long_prompt, 50_000)
        prefill = await client.stream(http, long, 1, Stream())
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    submitted, first_token = prefill.sent, prefill.first
    alone = [b - a for s in streams for a, b in s.gaps() if a >= all_started and b <= submitted]
    during = [b - a for s in streams for a, b in s.gaps() if b > submitted and a < first_token]
    p99_alone, p99_with = _percentile(alone, 99), _percentile(during, 99)
    return {"itl_p50_alone_s": _percentile(alone, 50), "itl_p99_alone_s": p99_alone, "itl_p99_with_prefill_s": p99_with,
            "itl_with_prefill_vs_alone": p99_with / p99_alone, "itl_gaps_alone": len(alone), "itl_gaps_with_prefill": len(during),
            "itl_ttft_under_decode_s": first_token - submitted,
            "itl_streams_outlasted_prefill": all(s.last > first_token for s in streams)}  # fmt: skip


async def _still_running(tasks: list[asyncio.Task]) -> None:
    """Yield to the streams for a moment; a stream that failed fails the measurement now."""
    await asyncio.sleep(0.002)
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _run_pinned(cpus: tuple[int, ...], work: Coroutine[Any, Any, dict]) -> dict:
    """Run the client in a thread of its own pinned to `cpus`, off the measured core."""
    result: dict[str, Any] = {}

    def run() -> None:
        with suppress(OSError):
            os.sched_setaffinity(0, cpus)  # 0: this thread only
        try:
            result["value"] = asyncio.run(work)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="vllm-bench-client", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
