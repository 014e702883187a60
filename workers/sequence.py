"""One request's state inside the engine: its tokens, its blocks and how far its KV is computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.wire import SamplingParams
from workers.detokenizer import Detokenizer


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    sampling: SamplingParams
    num_prompt_tokens: int = 0
    hash_seed: int = 0  # chain seed: model fingerprint + tenant salt
    session_id: str | None = None
    pin_ttl_s: float | None = None
    hold_blocks: bool = False
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order (extended as they fill)
    num_cached_blocks: int = 0  # leading blocks already registered in the pool's hash map
    num_computed: int = 0  # tokens whose K/V are in the pool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (reported in usage)
    num_transferred_tokens: int = 0  # prompt tokens whose KV arrived from a prefill node
    num_transferred_blocks: int = 0
    detokenizer: Detokenizer | None = None
    generator: torch.Generator | None = None  # a seeded request's own random stream (on the logits' device)
    matcher: Any = None  # the grammar's llguidance matcher (workers.grammar), None when unconstrained

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
