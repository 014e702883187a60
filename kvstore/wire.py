"""Everything that crosses the gateway <-> worker boundary: the internal API's paths, its token
header, its msgspec messages, and the per-turn route stats (one format, one encoder, one decoder).

Both sides (and the SDK, for `RouteStats`) import this module; neither imports the other. It
depends on msgspec only, so the SDK's base install can read it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

import msgspec

TOKEN_HEADER = "x-agentkv-token"  # the cluster token, on every internal call but health and metrics
ROUTE_HEADER = "x-agentkv-route"  # RouteStats of a turn, on every gateway response


class Paths:
    """The workers' internal HTTP API."""

    HEALTH = "/internal/health"
    INFO = "/internal/info"
    GENERATE = "/internal/generate"  # GenerateRequest -> NDJSON stream of TokenChunk
    PREFILL = "/internal/prefill"  # PrefillRequest -> PrefillResult (held until the reader is done)
    ABORT = "/internal/abort/{request_id:str}"
    UNPIN = "/internal/sessions/{session_id:str}/unpin"
    METRICS = "/metrics"

    @staticmethod
    def abort(request_id: str) -> str:
        return f"/internal/abort/{quote(request_id, safe='')}"

    @staticmethod
    def unpin(session_id: str) -> str:
        return f"/internal/sessions/{quote(session_id, safe='')}/unpin"


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # OpenAI's penalties on the reply's own tokens (each token's logit - presence * [seen] - frequency * count)
    # and its bias per token id, applied to the logits before any of the above.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    # The reply must match this grammar (llguidance's Lark text; JSON Schemas embedded with %json).
    # Engine-agnostic: the built-in engine runs it with llguidance, vLLM with its structured outputs.
    grammar: str | None = None
    # The prompt's last N tokens are the reply so far (a reply moved from a node that died): the grammar
    # consumes them before the first sample. Sent only to nodes that declare "grammar_resume".
    grammar_resume: int = 0


class PrefillRequest(msgspec.Struct, kw_only=True):
    """Ask a prefill node to compute a prompt's KV (reusing its own cache) and hold the blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    hash_salt: str = ""
    block_hashes: list[int] = msgspec.field(default_factory=list)  # the gateway's, computed once per turn
    hold_timeout_s: float = 30.0  # the blocks are released after this even if nobody reads them
    # The decode node's hold on the prompt's leading blocks (its own prefill of them): the prefill node
    # reads them instead of recomputing them. Only nodes that declare "kv_readback" are sent one.
    source_kv: PrefillResult | None = None


class PrefillResult(msgspec.Struct, kw_only=True):
    """A prefilled prompt held on `node_id`: where its blocks are and the first sampled token.

    The decode node reads the blocks it lacks (`block_ids[k:]`); its completion notification (or
    `hold_timeout_s`) ends the hold on P, which is the hold's only owner. An engine with its own
    KV connector (vLLM) hands its transfer parameters through `kv_transfer_params` instead.
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
    kv_transfer_params: dict[str, Any] | None = None  # engine-specific (vLLM's NixlConnector)
    # D can continue from `first_token`: the gateway may stream it (as `first_text`) at once and send D the
    # prompt plus that token, whose KV D computes itself. Set by engines whose D does so (vLLM: the token
    # falls inside P's partial last block, and D's connector recomputes its prompt's last token).
    continuable: bool = False
    first_text: str = ""
    read_tokens: int = 0  # prompt tokens whose KV P read from D's hold (a readback) instead of computing
    read_bytes: int = 0


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
    block_hashes: list[int] = msgspec.field(default_factory=list)  # the gateway's, computed once per turn
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


class RouteStats(msgspec.Struct, kw_only=True):
    """Where a turn ran and what it reused: `usage.agentkv` in the body, and the `x-agentkv-route`
    header (`source=planned` when headers leave before decoding, as in streaming)."""

    mode: str = "exact"  # the router's mode: exact | degraded
    decode_node: str = ""
    prefill_node: str | None = None
    session_id: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the decode node found in its own cache
    prefilled_tokens: int = 0  # prompt tokens computed for this turn (on P and/or D)
    transferred_tokens: int = 0  # prompt tokens whose KV moved P -> D
    transferred_blocks: int = 0
    transferred_bytes: int = 0
    ledger: str | None = None  # "extended" (exact-token continuation) | "full" | None
    source: str = "actual"  # actual | planned
    readback: bool = False  # P read D's cached prefix from D before prefilling the rest
    readback_tokens: int = 0  # ... this many tokens of it, which P lacked (moved D -> P)
    readback_bytes: int = 0
    hold_s: float | None = None  # readback: D exporting its prefix for P (vLLM's hold request)
    prefill_s: float | None = None  # P's prefill, reading D's prefix included: D waits this long
    early_first_token: bool = False  # P's first token was streamed at once; D continued from it
    migrated_tokens: int = 0  # the reply's node failed after this many tokens; `decode_node` finished it

    def to_header(self) -> str:
        """`k=v; k=v`: ASCII-safe (ids are percent-encoded), so any session id fits a header."""
        fields = msgspec.structs.asdict(self)
        return "; ".join(f"{k}={quote(str(v), safe='')}" for k, v in fields.items() if v is not None)

    @classmethod
    def from_header(cls, value: str | None) -> RouteStats | None:
        if not value:
            return None
        pairs = (item.partition("=") for item in value.split(";"))
        raw: dict[str, Any] = {k.strip(): unquote(v.strip()) for k, sep, v in pairs if sep and k.strip() in cls.__struct_fields__}
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError:
            return None
