"""The node record: what a worker publishes about itself and the gateway reads to route.

A node's `generation` changes on every start, so index entries written by a dead incarnation can
be told apart from live ones without scanning.
"""

from __future__ import annotations

from enum import Enum

import msgspec


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class NodeLoad(msgspec.Struct):
    """Live load, refreshed at least once a second."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0


class NodeRecord(msgspec.Struct):
    node_id: str
    role: Role
    address: str  # base URL of the worker's internal HTTP API, e.g. http://127.0.0.1:8101
    block_size: int
    model_fingerprint: str
    capacity_blocks: int
    generation: int
    transfer_backend: str = "nixl"
    transfer_metadata: bytes = b""  # NIXL agent metadata (or ucxx listener address), opaque here
    started_at: float = 0.0
    model_name: str = ""
    model_path: str = ""  # directory with the tokenizer (and weights) the node loaded
    max_model_len: int = 0
    engine: str = "builtin"  # builtin | vllm
    # What the engine supports beyond generate/prefill/abort; the gateway degrades visibly without them.
    features: list[str] = msgspec.field(default_factory=lambda: ["session_pins", "grammar_resume"])
    # What taking over another node's prefill delays this node's first token by, in prompt tokens (the
    # router's unit). 0: the built-in engine adopts the blocks at its next step. vLLM's connector starts
    # the pull in one engine step and sees it done in a later one.
    handover_tokens: float = 0.0
