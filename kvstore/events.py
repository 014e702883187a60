"""KV events: what a node's pool tells the index. Small tagged msgspec structs, batched per step.

The index applies them in order; `AllCleared` drops all of a node's entries (the pool's `reset_cache`).
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Full blocks that became cached: one chain, in prefix order, each block the child of the one
    before it and the first the child of `parent_hash` (None: the first block of a prompt).

    The parent lets the index know, per node, which blocks have their whole prefix cached, so a
    lookup binary-searches instead of checking every block (kvstore/index.py).
    """

    block_hashes: list[int]
    parent_hash: int | None = None


class BlockRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Blocks evicted from the pool (their hashes no longer resolve on this node)."""

    block_hashes: list[int]


class AllCleared(msgspec.Struct, tag="cleared", frozen=True):
    """The node dropped its whole cache."""


KVEvent = BlockStored | BlockRemoved | AllCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events of one node in order; `generation` ties them to one incarnation of the node."""

    node_id: str
    generation: int
    events: list[KVEvent]
