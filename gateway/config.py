"""Gateway configuration: one typed struct, built from CLI options and environment variables."""

from __future__ import annotations

import math
import re
from typing import Literal

import msgspec

_TENANT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # tenant ids are part of Redis keys: no ':'


class RouterConfig(msgspec.Struct, kw_only=True):
    """Weights of the router's cost function (docs/gateway.md#router); units are prompt tokens."""

    # "prefix": the cost function. "sticky" / "round_robin": baselines for benchmarks (a session's
    # last node, else decode nodes in turn; always local prefill; the index only feeds the header).
    policy: Literal["prefix", "sticky", "round_robin"] = "prefix"
    prefill_threshold_tokens: int = 64  # D lacking more than this may hand the prefill to a P node
    load_tokens: float = 128.0  # cost of one running or waiting sequence on a node
    # An agent session between calls (running a tool) whose last turn ran on a node counts there as
    # this many running sequences: it will be back. Without it, new sessions pile onto the nodes
    # whose sessions happen to be between calls (docs/simulate.md measured the tail it costs).
    idle_session_weight: float = 1.0
    session_idle_s: float = 60.0  # ... for this long after its last turn ended
    affinity_tokens: float = 256.0  # bonus for the node that served the session's last turn
    prefill_worth: float = 2.0  # P is used only if its cost <= prefill_worth x what D lacks
    # ... and a `both` node as P only if it is cheaper outright: the premium buys D steadier decodes, but a
    # `both` P stalls its own decodes for the prefill.
    both_prefill_worth: float = 1.0
    # A P and a D that both declare "kv_readback" (vLLM workers): P reads the blocks D holds beyond its own
    # cache when they are at least this many tokens (vLLM's kv_recompute_threshold), instead of lacking them.
    readback_min_tokens: int = 64
    # ... and its fixed cost: D's hold request and P's read each wait for an engine step. Measured on this
    # CPU (docs/vllm.md, the protocol mapped): 0.4 s hold + 0.6 s read beside ~3.5 ms per prefilled token, ~280 tokens.
    readback_tokens: float = 256.0
    max_prefill_queue: int = 8  # a P node with more waiting prefills than this is skipped
    # 1: when P's engine says D can continue from P's first token (vLLM), that token goes to the client at
    # once and D's take-over delays the second token instead of the first. 0: D samples every token.
    early_first_token: int = 1
    # 1: a reply whose node fails mid-stream moves to another node, which continues from the tokens
    # already sent (prompt + reply so far; greedy replies come out as if nothing happened). 0: an error event.
    migrate: int = 1
    # Moving one block costs about this many tokens of prefill: 0.15 ms per 737 kB block over NIXL
    # against 1.6 ms per prefilled token here (README benches); rounded up, moving stays cheap.
    transfer_tokens_per_block: float = 1.0
    index_timeout_s: float = 0.25  # lookup slower than this -> DEGRADED for this request
    load_report_age_s: float = 0.6  # how old a node's reported load can be (worker heartbeat 0.5 s + margin)


class GatewayConfig(msgspec.Struct, kw_only=True):
    redis_url: str = "redis://127.0.0.1:6379"
    namespace: str = "akv"  # key prefix shared with the workers' registry and index
    api_keys: dict[str, str] = msgspec.field(default_factory=dict)  # API key -> tenant id; empty = open
    cluster_token: str | None = None  # sent to workers as x-agentkv-token
    session_ttl_s: float = 300.0
    max_session_ttl_s: float = 24 * 3600.0
    default_max_tokens: int = 256
    default_temperature: float = 1.0  # OpenAI's default
    model_name: str | None = None  # name shown in /v1/models (default: the workers' model name)
    tokenizer: str | None = None  # tokenizer directory or HF id (default: the workers' model_path)
    worker_connect_timeout_s: float = 5.0
    worker_read_timeout_s: float = 300.0  # longest silence on a worker stream (queueing, long prefill)
    prefill_hold_timeout_s: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get a 413 (a prompt must also fit the context)
    node_refresh_s: float = 1.0
    index_purge_s: float = 5.0  # how often dead or restarted nodes' index entries are dropped
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)

    def open_access(self) -> bool:
        return not self.api_keys


def parse_api_keys(spec: str | None) -> dict[str, str]:
    """`key1:tenant-a,key2:tenant-b` (a key without `:tenant` gets a tenant of its own), or
    `@path` to a file with one `key[:tenant]` per line. Keys are secrets: never logged."""
    if not spec:
        return {}
    if spec.startswith("@"):
        with open(spec[1:], encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first key
            items = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    else:
        items = [item.strip() for item in spec.split(",") if item.strip()]
    keys: dict[str, str] = {}
    for n, item in enumerate(items):
        key, _, tenant = (part.strip() for part in item.partition(":"))
        if not key:
            raise ValueError(f"API key #{n + 1} is empty")
        if key in keys:  # the later one would silently log the earlier tenant's key in as its own
            raise ValueError(f"API key #{n + 1} repeats an earlier key (one key, one tenant)")
        tenant = tenant or f"tenant-{n + 1}"
        if not _TENANT_ID.fullmatch(tenant):
            raise ValueError(f"tenant name {tenant!r} (key #{n + 1}): use 1-64 letters, digits, '.', '_' or '-'")
        keys[key] = tenant
    return keys


def router_config(spec: str, policy: str = "prefix") -> RouterConfig:
    """`key=value,...` over RouterConfig's weights (`agentkv gateway --router`, $AGENTKV_ROUTER). The
    defaults are calibrated on a 2-core CPU; a deployment recalibrates them, e.g. `readback_tokens`
    for engines whose steps take milliseconds rather than a tenth of a second."""
    kinds = {f.name: f.type for f in msgspec.structs.fields(RouterConfig) if f.name != "policy"}
    weights: dict[str, float | int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not value:
            raise ValueError(f"{item!r}: write key=value")
        if key not in kinds:
            raise ValueError(f"unknown router weight {key!r} (the policy has its own option); known: {', '.join(sorted(kinds))}")
        try:
            weights[key] = msgspec.convert(value, kinds[key], strict=False)
        except msgspec.ValidationError:
            raise ValueError(f"{key}={value}: expected {'an integer' if kinds[key] is int else 'a number'}") from None
        if not math.isfinite(weights[key]) or weights[key] < 0:
            raise ValueError(f"{key}={value}: a router weight is a finite number >= 0")
    return RouterConfig(policy=policy, **weights)
