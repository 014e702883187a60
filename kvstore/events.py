"""KV events: what a node's pool tells the index. Small tagged msgspec structs, batched per step.

The index applies them in order; `AllCleared` resets a node (e.g. after a restart or resync).
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Full blocks that became cached (hashes in prefix order)."""

    block_hashes: list[int]


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
