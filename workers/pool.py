"""The paged KV pool: block memory plus the bookkeeping that makes blocks reusable.

Memory layout: ONE contiguous tensor `kv[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]`.
Block-major order makes one block a single contiguous byte range, so a transfer moves a block with
one descriptor (adjacent blocks coalesce into one) instead of one per layer. Attention reads a
layer's keys as the strided view `kv[:, layer, 0]`, which gathers per block (12 KiB runs).

Bookkeeping follows vLLM v1's block pool: per-block refcounts; a free list in LRU order whose
blocks keep their hash until they are reused (lazy eviction, so a freed prefix is still a cache
hit); a hash -> block map; pins that hold a reference until they expire (an agent session that
is off running a tool). Every change to what is cached is recorded as a KV event for the index.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvstore.events import AllCleared, BlockRemoved, BlockStored, KVEvent


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the caller waits, preempts or refuses, the pool never overcommits."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and cached
    parent_hash: int | None = None  # the hash of the block before it in its sequence (None: the first)


@dataclass(slots=True)
class Pin:
    block_ids: list[int]
    expires_at: float


@dataclass
class KVLayout:
    """Shape of the model's KV per token; the pool multiplies it by blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"


@dataclass
class BlockPool:
    num_blocks: int
    block_size: int
    layout: KVLayout
    kv: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        lay = self.layout
        shape = (self.num_blocks, lay.num_layers, 2, self.block_size, lay.num_kv_heads, lay.head_dim)
        self.kv = torch.zeros(shape, dtype=lay.dtype, device=lay.device)
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        # Free blocks, least recently freed first. Cached ones stay findable until popped.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self._by_hash: dict[int, int] = {}
        self._pins: dict[str, Pin] = {}
        self._events: list[KVEvent] = []

    # -- capacity ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (including cached ones that would be evicted)."""
        return len(self._free)

    @property
    def bytes_per_block(self) -> int:
        return self.kv[0].nbytes

    # -- prefix cache -----------------------------------------------------------------------
    def cached_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `block_hashes` (no reference taken)."""
        found: list[int] = []
        for h in block_hashes:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def cached_blocks(self) -> list[tuple[int, int | None]]:
        """(hash, parent hash) of every block this pool can serve now (used to resync the index)."""
        return [(h, self.blocks[block_id].parent_hash) for h, block_id in self._by_hash.items()]

    def acquire(self, block_ids: list[int]) -> None:
        """Take a reference on existing blocks (a cache hit, a transfer source, a pin)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def cache(self, block_id: int, block_hash: int, parent_hash: int | None) -> int:
        """Mark a full block as holding the prefix named by `block_hash`, the child of the block
        named `parent_hash` (None for a sequence's first block).

        Returns the block that now serves the hash: an older block that already serves it wins,
        so two sequences that computed the same block do not both publish it.
        """
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise ValueError(f"block {block_id} is free; only referenced blocks can be cached")
        existing = self._by_hash.get(block_hash)
        if existing is not None:
            return existing
        if block.block_hash is not None:
            raise ValueError(f"block {block_id} already holds hash {block.block_hash:#x}")
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        self._by_hash[block_hash] = block_id
        self._record(BlockStored([block_hash], parent_hash))
        return block_id

    # -- allocation -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Hand out `n` fresh blocks (refcount 1), evicting the least recently freed first."""
        if n > len(self._free):
            self.expire_pins()
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        ids: list[int] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Pass a sequence's blocks in order: the tail is
        released first, so the prefix (most shareable) stays cached longest."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise ValueError(f"block {block_id} released more often than acquired")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self._by_hash.get(block.block_hash) == block.block_id:
            del self._by_hash[block.block_hash]
            self._record(BlockRemoved([block.block_hash]))
        block.block_hash = block.parent_hash = None

    # -- pins (agent sessions between turns) -----------------------------------------------
    def pin(self, session_id: str, block_ids: list[int], ttl_s: float, now: float | None = None) -> None:
        """Keep `block_ids` from eviction until `ttl_s` from now; replaces the session's old pin."""
        self.acquire(block_ids)
        self.unpin(session_id)
        self._pins[session_id] = Pin(list(block_ids), (time.monotonic() if now is None else now) + ttl_s)

    def unpin(self, session_id: str) -> int:
        """Drop the session's pin; returns how many blocks it held."""
        pin = self._pins.pop(session_id, None)
        if pin is None:
            return 0
        self.release(pin.block_ids)
        return len(pin.block_ids)

    def expire_pins(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [sid for sid, pin in self._pins.items() if pin.expires_at <= now]
        for sid in expired:
            self.unpin(sid)
        return len(expired)

    # -- whole-cache operations ------------------------------------------------------------
    def reset_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents, just not their names)."""
        for block in self.blocks:
            block.block_hash = block.parent_hash = None
        self._by_hash.clear()
        self._record(AllCleared())

    # -- events ----------------------------------------------------------------------------
    def _record(self, event: KVEvent) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(event, BlockRemoved) and isinstance(last, BlockRemoved):
            last.block_hashes.extend(event.block_hashes)
        elif isinstance(event, BlockStored) and isinstance(last, BlockStored) and event.parent_hash == last.block_hashes[-1]:
            last.block_hashes.extend(event.block_hashes)  # the chain goes on
        else:
            self._events.append(event)

    def drain_events(self) -> list[KVEvent]:
        """Events since the last drain, in order; removals in a row and stores that continue one
        chain are merged."""
        events, self._events = self._events, []
        return events
