"""The vLLM OpenAI server a `--engine vllm` worker fronts: spawned with its own interpreter, or attached to.

vLLM runs from another environment (`--vllm-python`; it pins its own transformers), in a session
of its own so that stopping the worker stops its whole process group: killing only the API server
leaves its engine processes behind, holding the NIXL and event ports. It also gets SIGTERM if the
worker dies first (PR_SET_PDEATHSIG). The settings below are the ones that work on vLLM's CPU build
(docs/vllm.md): fp32 so greedy output does not depend on cache hits, one KV connector (NIXL) for
both roles, KV events published to the worker's ZMQ socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shlex
import socket
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SITECUSTOMIZE = Path(__file__).with_name("vllm_sitecustomize")
# With bidirectional transfer, vLLM keeps a finished P/D turn's blocks on the decode node this long for a
# prefill node to read (its default is 480 s); they cannot be evicted meanwhile.
DECODER_HOLD_S = 30
# A prefill node reads a decode node's blocks only when they hold at least this many tokens beyond its own
# cache (vLLM's default, set here so that the worker's accounting of the read uses the same value).
READ_MIN_TOKENS = 64


class VllmError(RuntimeError):
    """The vLLM server failed a call (`status`: its HTTP status, 0 without one), or a start."""

    def __init__(self, message: str, status: int = 0, aborted: bool = False) -> None:
        super().__init__(message)
        self.status, self.aborted = status, aborted


@dataclass
class VllmServer:
    url: str
    process: subprocess.Popen | None = None  # None: attached to a server someone else runs

    @classmethod
    def spawn(cls, python: str, model_dir: Path | str, served_name: str, port: int, *, block_size: int, kv_cache_bytes: int,
              max_num_seqs: int, max_model_len: int, events: str, replay: str, side_channel_port: int, side_channel_host: str = "127.0.0.1",
              max_step_tokens: int = 0, extra_args: str = "") -> VllmServer:  # fmt: skip
        cores = sorted(os.sched_getaffinity(0))
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "float32", "--block-size", str(block_size), "--kv-cache-memory-bytes", str(kv_cache_bytes),
                "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len), "--enforce-eager", "--enable-prefix-caching",
                "--enable-prompt-tokens-details",
                "--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                                    "kv_buffer_device": "cpu",  # a prefill node may read a decode node's blocks:
                                                    "kv_connector_extra_config": {"bidirectional_kv_xfer": True,
                                                                                  "decoder_kv_blocks_ttl": DECODER_HOLD_S,
                                                                                  "kv_recompute_threshold": READ_MIN_TOKENS}}),
                "--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                  "endpoint": events, "replay_endpoint": replay, "topic": "kv"}),
                *(["--max-num-batched-tokens", str(max_step_tokens)] if max_step_tokens else []),
                *shlex.split(extra_args)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would override the bytes
        env.update(
            VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)), VLLM_CPU_NUM_OF_RESERVED_CPU="0",
            OMP_NUM_THREADS=str(len(cores)), VLLM_NIXL_SIDE_CHANNEL_HOST=side_channel_host,  # where decode nodes reach it
            VLLM_NIXL_SIDE_CHANNEL_PORT=str(side_channel_port), NIXL_NO_PROG_THREAD="1", AGENTKV_VLLM_KEEP_CORES="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(SITECUSTOMIZE), os.environ.get("PYTHONPATH")])),
        )  # fmt: skip
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        return cls(f"http://127.0.0.1:{port}", process)

    def exited(self) -> int | None:
        """The spawned server's exit code once it has exited (None while running, or when attached)."""
        return self.process.poll() if self.process is not None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after `timeout_s`. Idempotent."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the group may outlive its leader: make sure
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return


def default_python() -> str:
    return os.environ.get("AGENTKV_VLLM_PYTHON") or sys.executable


def _die_with_parent() -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spare_port() -> int:
    """A free port below the kernel's ephemeral range (32768+): no bind(0) elsewhere (vLLM's own
    port picking included) can take it between this check and vLLM's bind. Seen with ports from
    bind(0): another socket took the NIXL side-channel port first and vLLM hung at start."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", port)):
            return port
    raise OSError("no free port in 20000-32000")
