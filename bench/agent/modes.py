"""The systems under test, and how each is started on this machine (with agentkv.stack).

Every mode is a system (agentkv or the peer), a topology (which workers, on which cores), a
routing policy and a workload. Topologies share the machine's first two cores so every mode gets
the same hardware:

    pair           two workers in role `both`, one core each: prefill and decode share each core.
                   The three routing policies run here, and so does the colocated side of the
                   head-of-line comparison
    disaggregated  a prefill worker on one core, a decode worker on the other
    peer           `transformers serve --continuous-batching`, both cores, two threads, same weights
    vllm_peer      one vLLM OpenAI server alone (the vLLM CPU build), both cores: vLLM's own split of
                   one engine core plus one for its API frontend; prefix caching, fp32 like our
                   workers, blocks of 32 (its CPU attention's minimum), `--enforce-eager`
    vllm_pd        `agentkv worker --engine vllm`: a prefill and a decode vLLM worker, one core each
    vllm_pair      two `--engine vllm` workers in role `both`, one core each: the router keeps each
                   session where its prefix is cached and moves KV between them when that is cheaper

One thread per worker keeps the comparison fair on a shared machine: a two-thread worker stalls
at every parallel region whenever another process holds one of its cores.

A topology's workers start once, with one gateway per routing policy in front of them. Modes
that share workers never share cache entries: each run's prompts start with their own nonce
(workload.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentkv.stack import Processes, StackError, Worker, first_cores, free_port, one_core_each, vllm_workers


@dataclass(frozen=True)
class Mode:
    name: str
    system: Literal["agentkv", "transformers_serve", "vllm"]
    topology: str
    routing: Literal["prefix", "sticky", "round_robin"] | None
    workload: Literal["agent", "hol_mix"]
    block_size: int | None = None  # None: the run's; vLLM's CPU build needs a multiple of 32


VLLM_BLOCK_SIZE = 32

MODES = (
    Mode("round_robin", "agentkv", "pair", "round_robin", "agent"),
    Mode("sticky", "agentkv", "pair", "sticky", "agent"),
    Mode("prefix_aware", "agentkv", "pair", "prefix", "agent"),
    Mode("colocated", "agentkv", "pair", "prefix", "hol_mix"),
    Mode("disaggregated", "agentkv", "disaggregated", "prefix", "hol_mix"),
    Mode("transformers_serve", "transformers_serve", "peer", None, "agent"),
    Mode("vllm", "vllm", "vllm_peer", None, "agent", VLLM_BLOCK_SIZE),
    Mode("vllm_pd", "agentkv", "vllm_pd", "prefix", "agent", VLLM_BLOCK_SIZE),
    Mode("vllm_pair", "agentkv", "vllm_pair", "prefix", "agent", VLLM_BLOCK_SIZE),
)


def topologies(vllm: str = "") -> dict[str, tuple[Worker, ...]]:
    """Workers per topology; `vllm`: the interpreter the vLLM workers run vLLM with."""
    return {"pair": one_core_each("both", "both"), "disaggregated": one_core_each("prefill", "decode"), "peer": (),
            "vllm_peer": (), "vllm_pd": vllm_workers(vllm), "vllm_pair": vllm_workers(vllm, ("both", "both"))}  # fmt: skip


def kv_bytes_per_block(model: str, block_size: int) -> int:
    """KV bytes of one block as the workers store it: layers x (K, V) x tokens x heads x dim x dtype."""
    from transformers import AutoConfig

    from workers.loader import default_device, default_dtype, resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model)[0])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = default_dtype(default_device()).itemsize
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * head_dim * itemsize


PAGE_TOKENS = 256  # transformers' continuous-batching block ("page") size


@contextmanager
def transformers_serve(model_dir: Path, log_dir: Path, *, kv_cache_gb: float, kv_bytes_per_token: int,
                       timeout_s: float = 300.0) -> Iterator[str]:  # fmt: skip
    """`transformers serve --continuous-batching` on the same weights (the dequantized safetensors
    directory: it cannot serve the GGUF) and cores, one thread per core; yields its URL.

    Its KV cache is bounded to `kv_cache_gb` like our workers' pools: left alone it sizes the cache
    from free memory, which on a CPU host means most of the machine's RAM.
    """
    exe = Path(sys.executable).with_name("transformers")
    exe = str(exe) if exe.exists() else shutil.which("transformers")
    if exe is None:
        raise StackError("the `transformers` command is missing: install transformers[serving]")
    cpus, port = tuple(first_cores(2)), free_port()
    blocks = max(16, int(kv_cache_gb * 2**30 // (PAGE_TOKENS * kv_bytes_per_token)))
    threads = str(max(1, len(cpus)))
    with Processes(log_dir) as procs:
        procs.spawn("transformers-serve", [
            exe, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            "--cb-num-blocks", str(blocks), str(model_dir),
        ], env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, cpus=cpus)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        procs.wait_until(lambda http: http.get(f"{url}/health").status_code == 200, "transformers serve", timeout_s)
        yield url


@contextmanager
def vllm_serve(python: str, model_dir: Path, log_dir: Path, *, kv_cache_gb: float, block_size: int = VLLM_BLOCK_SIZE,
               timeout_s: float = 900.0) -> Iterator[str]:  # fmt: skip
    """One vLLM OpenAI server as a user would start it, on both cores; yields its URL.

    Its defaults, except: prefix caching on and `--enable-prompt-tokens-details` (so its usage says
    what it found cached), fp32 (its CPU default is bf16; our workers and `vllm_pd` compute in
    fp32), the KV cache bounded to `kv_cache_gb` like every other server here, and
    `--enforce-eager` (the `vllm_pd` workers run eager too, and compiling takes minutes here).
    vLLM's CPU build reserves one core for its frontend and binds its engine to the rest.
    """
    if not python or not Path(python).exists():
        raise StackError("no vLLM interpreter: set AGENTKV_VLLM_PYTHON or build .venv-vllm (make test does)")
    cpus, port = tuple(first_cores(2)), free_port()
    with Processes(log_dir) as procs:
        server = procs.spawn("vllm", [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--block-size", str(block_size),
            "--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30)), "--enable-prefix-caching",
            "--enable-prompt-tokens-details", "--enforce-eager",
        ], cpus=cpus)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            procs.wait_until(lambda http: http.get(f"{url}/health").status_code == 200, "vLLM", timeout_s)
            yield url
        finally:  # its engine process is a child of the API server: stop the whole group
            procs.stop()
            with suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
