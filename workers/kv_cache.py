"""What each sequence needs from the block pool (the pool itself knows nothing of sequences).

Admission looks up the longest cached prefix, takes references on those blocks and allocates the
rest; each step gets a slot for every new token; blocks are hashed and published as soon as they
are full (prompt AND generated tokens, so the next agent turn hits them); finishing releases them.
"""

from __future__ import annotations

from kvstore.hashing import extend_block_hashes
from workers.pool import BlockPool
from workers.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size

    def try_admit(self, seq: Sequence, reserve: int = 0) -> bool:
        """Give `seq` blocks for all its tokens, reusing the cached prefix. False if the pool is too full,
        counting `reserve` blocks kept free for the running sequences to grow into."""
        if seq.block_table:  # blocks supplied from outside (adopted after a transfer)
            return True
        bs = self.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, bs, seq.hash_seed)  # the gateway's, or computed here
        hit = self.pool.cached_prefix(seq.block_hashes)
        if len(hit) * bs >= len(seq):  # a full hit leaves no logits: recompute the last block
            hit = hit[:-1]
        new = blocks_for(len(seq), bs) - len(hit)
        evictable_hits = sum(1 for b in hit if self.pool.blocks[b].ref_count == 0)
        if self.pool.num_free - evictable_hits < new + reserve:
            self.pool.expire_pins()
            if self.pool.num_free - evictable_hits < new + reserve:
                return False
        self.pool.acquire(hit)
        seq.block_table = hit + self.pool.allocate(new)
        seq.num_computed = len(hit) * bs
        seq.num_cached_blocks = len(hit)
        seq.num_cached_tokens = max(seq.num_cached_tokens, min(seq.num_computed, seq.num_prompt_tokens))
        return True

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks to hold the sequence's first `num_tokens` tokens (raises OutOfBlocks)."""
        missing = blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        if missing > 0:
            seq.block_table += self.pool.allocate(missing)

    def commit(self, seq: Sequence) -> None:
        """Hash and publish every block that is now full of computed tokens."""
        bs = self.block_size
        full = seq.num_computed // bs
        if full <= seq.num_cached_blocks:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids[: full * bs], bs, seq.hash_seed)
        for i in range(seq.num_cached_blocks, full):
            self.pool.cache(seq.block_table[i], seq.block_hashes[i], seq.block_hashes[i - 1] if i else None)
        seq.num_cached_blocks = full

    def full_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_table[: seq.num_cached_blocks]

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_cached_blocks = 0

