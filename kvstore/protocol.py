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


class PrefillRequest(msgspec.Struct, kw_only=True):
    """Ask a prefill node to compute a prompt's KV (reusing its own cache) and hold the blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    hash_salt: str = ""
    hold_timeout_s: float = 30.0  # the blocks are released after this even if nobody reads them


class PrefillResult(msgspec.Struct, kw_only=True):
    """A prefilled prompt held on `node_id`: where its blocks are and the first sampled token.

    The decode node reads the blocks it lacks (`block_ids[k:]`) and then releases the hold.
    """

    request_id: str
    node_id: str
    generation: int
    block_ids: list[int]  # full blocks in prefix order, then the partial last block
    num_computed: int  # prompt tokens whose KV the blocks hold
    first_token: int
    first_logprob: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefill node found in its own cache


class GenerateRequest(msgspec.Struct, kw_only=True):
    """Run one sequence on a worker: prefill what it lacks, then decode and stream tokens.

    With `remote_kv`, the prompt was prefilled elsewhere: the worker pulls only the blocks it does
    not hold, and falls back to computing them itself if the transfer fails.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    session_id: str | None = None
    pin_ttl_s: float | None = None  # keep the sequence's blocks pinned this long after finishing
    hash_salt: str = ""  # tenant salt for block hashes
    remote_kv: PrefillResult | None = None


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
    transferred_tokens: int = 0  # prompt tokens whose KV arrived from the prefill node
    transferred_blocks: int = 0
    transferred_bytes: int = 0
    error: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Internal API error: `code` is what the gateway maps to the OpenAI envelope."""

    message: str
    code: str = "internal_error"
    param: str | None = None
