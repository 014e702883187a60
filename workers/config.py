"""A worker's settings: the CLI builds them, the process entry (workers.main) reads them."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from kvstore.nodes import Role


@dataclass
class WorkerConfig:
    redis_url: str
    role: Role = Role.BOTH
    host: str = "127.0.0.1"
    port: int = 8101
    node_id: str = ""
    model: str = "smollm2"
    block_size: int = 16
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 64
    mixed_prefill_tokens: int = 512  # built-in engine: most prompt tokens in a step with decodes
    itl_slowdown: float = 1.5  # built-in engine: a step with prompt tokens costs at most this many decode steps
    # Built-in engine: a new prompt with at most this many uncached tokens is computed in one step, whatever
    # the decodes beside it pay (an agent's next turn); 0 chunks every prompt within itl_slowdown.
    short_prompt_tokens: int = 256
    threads: int | None = None
    cpus: list[int] = field(default_factory=list)
    cluster_token: str | None = None
    insecure: bool = False  # serve the internal API without a token (refused otherwise)
    namespace: str = "akv"  # Redis key prefix, the gateway's too
    transfer_devices: str = ""  # UCX_NET_DEVICES for the KV transport ("": the device of the advertised host)
    transfer: str = "nixl"
    transfer_timeout_s: float = 10.0
    heartbeat_ttl_s: float = 3.0
    drain_timeout_s: float = 5.0
    advertise_host: str | None = None
    engine: str = "builtin"  # builtin | vllm
    vllm_url: str = ""  # attach to this vLLM server instead of starting one
    vllm_python: str = ""  # interpreter that has vLLM (default: $AGENTKV_VLLM_PYTHON, else this one)
    vllm_args: str = ""  # more arguments for the vLLM server we start
    # vLLM on a decode node: most tokens in one engine step (its --max-num-batched-tokens, at least
    # max_num_seqs), so a prompt computed beside the decodes is chunked: steadier inter-token latency,
    # lower throughput (docs/vllm.md measures both). 0: vLLM's default (2048 on a CPU), as on other roles.
    vllm_decode_step_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}-{self.role.value}-{self.port}"

    @property
    def address(self) -> str:
        return f"http://{self.advertise_host or self.host}:{self.port}"
