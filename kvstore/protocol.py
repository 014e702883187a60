"""Messages between the gateway and the workers (the workers' internal HTTP API).

Both sides import these msgspec Structs from here; neither imports the other.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False


class GenerateRequest(msgspec.Struct, kw_only=True):
    """Run one sequence on a worker: prefill what it lacks, then decode and stream tokens."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    session_id: str | None = None
    pin_ttl_s: float | None = None  # keep the sequence's blocks pinned this long after finishing
    hash_salt: str = ""  # tenant salt for block hashes


class TokenChunk(msgspec.Struct, kw_only=True):
    """One streamed step of a sequence (newline-delimited JSON on the wire)."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in this node's prefix cache
    completion_tokens: int = 0
    error: str | None = None
