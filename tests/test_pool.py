"""The block pool and the per-sequence KV manager, without a model."""

import time
from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.events import AllCleared, BlockRemoved, BlockStored
from kvstore.hashing import block_hashes, hash_seed
from kvstore.wire import SamplingParams
from workers.kv_cache import KVCacheManager
from workers.pool import BlockPool, KVLayout, OutOfBlocks
from workers.sequence import Sequence

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4)
SEED = hash_seed("pool-test")


def make_pool(n=8, bs=4) -> BlockPool:
    return BlockPool(n, bs, LAYOUT)


def check_invariants(pool: BlockPool) -> None:
    """The pool's bookkeeping agrees with itself: refcounts, free list, hash map, pins."""
    for block in pool.blocks:
        assert block.ref_count >= 0, f"negative refcount on block {block.block_id}"
        assert (block.ref_count == 0) == (block.block_id in pool._free), f"block {block.block_id}: free list != refcount 0"
    for h, block_id in pool._by_hash.items():
        assert pool.blocks[block_id].block_hash == h, f"hash map points at block {block_id}, which holds another hash"
    pinned = Counter(block_id for pin in pool._pins.values() for block_id in pin.block_ids)
    for block_id, n in pinned.items():
        assert pool.blocks[block_id].ref_count >= n, f"pinned block {block_id} has fewer references than pins"


def test_one_block_is_one_contiguous_range():
    pool = make_pool()
    assert pool.kv[3].is_contiguous()
    assert pool.kv[3].data_ptr() == pool.kv.data_ptr() + 3 * pool.bytes_per_block
    assert pool.bytes_per_block == 2 * 2 * 4 * 1 * 4 * 4


def test_freed_block_keeps_its_hash_until_reused():
    pool = make_pool(n=2)
    [b] = pool.allocate(1)
    pool.cache(b, 111, None)
    pool.release([b])
    assert pool.cached_prefix([111]) == [b]  # lazy eviction: still a hit
    pool.allocate(2)  # reuses it
    assert pool.cached_prefix([111]) == []
    assert pool.drain_events() == [BlockStored([111]), BlockRemoved([111])]


def test_eviction_takes_least_recently_freed_first():
    pool = make_pool(n=3)
    a, b, c = pool.allocate(3)
    for blk, h in ((a, 1), (b, 2), (c, 3)):
        pool.cache(blk, h, None)
    pool.release([c])
    pool.release([a])
    pool.release([b])
    pool.allocate(1)
    assert pool.cached_prefix([1]) == [a] and pool.cached_prefix([3]) == []


def test_sequence_release_evicts_tail_before_prefix():
    pool = make_pool(n=3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        pool.cache(blk, 10 + i, 10 + i - 1 if i else None)
    pool.release(blocks)
    pool.allocate(1)
    assert pool.cached_prefix([10, 11]) == blocks[:2]


def test_pinned_block_is_never_evicted_until_expiry():
    pool = make_pool(n=2)
    [b] = pool.allocate(1)
    pool.cache(b, 7, None)
    now = time.monotonic()
    pool.pin("s1", [b], ttl_s=10, now=now)
    pool.release([b])
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.cached_prefix([7]) == [b]
    assert pool.expire_pins(now=now + 11) == 1
    assert len(pool.allocate(2)) == 2


def test_duplicate_block_keeps_the_first_publisher():
    pool = make_pool()
    a, b = pool.allocate(2)
    assert pool.cache(a, 5, None) == a
    assert pool.cache(b, 5, None) == a
    assert pool.drain_events() == [BlockStored([5])]


def test_events_merge_chains_and_reset_clears():
    pool = make_pool(n=8)
    blocks = pool.allocate(5)
    for i, blk in enumerate(blocks[:3]):
        pool.cache(blk, i + 1, i if i else None)  # one chain: 1 <- 2 <- 3
    pool.cache(blocks[3], 9, 1)  # a branch off block 1: a new event
    assert sorted(pool.cached_blocks()) == [(1, None), (2, 1), (3, 2), (9, 1)]
    pool.reset_cache()
    assert pool.drain_events() == [BlockStored([1, 2, 3]), BlockStored([9], 1), AllCleared()]
    assert pool.cached_blocks() == []


def test_out_of_blocks_is_a_clear_error():
    pool = make_pool(n=2)
    with pytest.raises(OutOfBlocks, match="need 3 KV blocks, 2 free"):
        pool.allocate(3)


def test_prefix_hit_always_leaves_a_token_to_compute():
    pool = make_pool(n=8, bs=4)
    kv = KVCacheManager(pool)
    first = Sequence("a", list(range(8)), SamplingParams(), hash_seed=SEED)
    assert kv.try_admit(first)
    first.num_computed = 8
    kv.commit(first)
    kv.free(first)
    again = Sequence("b", list(range(8)), SamplingParams(), hash_seed=SEED)
    assert kv.try_admit(again)
    assert again.num_computed == 4  # the last full block is recomputed, so logits exist
    longer = Sequence("c", list(range(10)), SamplingParams(), hash_seed=SEED)
    assert kv.try_admit(longer)
    assert longer.num_computed == 8 and longer.num_cached_tokens == 8


class PoolMachine(RuleBasedStateMachine):
    """Random admit / step / finish / abort / pin / expire operations on a small pool.

    Invariants: blocks of running sequences and pinned blocks never change hash (never evicted
    or reused); the bookkeeping is consistent; freeing everything returns every block.
    """

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, 4, LAYOUT)
        self.kv = KVCacheManager(self.pool)
        self.running: dict[str, Sequence] = {}
        self.pinned: dict[str, list[tuple[int, int | None]]] = {}
        self.counter = 0
        self.clock = time.monotonic()

    @rule(prefix=st.integers(0, 3), length=st.integers(1, 20))
    def admit(self, prefix, length):
        # Sequences share one of four prefixes, so prefix hits and sharing are common.
        tokens = [prefix] * 8 + list(range(length))
        self.counter += 1
        seq = Sequence(f"s{self.counter}", tokens, SamplingParams(), hash_seed=SEED)
        if self.kv.try_admit(seq):
            self.running[seq.request_id] = seq

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def compute_and_grow(self, data):
        seq = data.draw(st.sampled_from(sorted(self.running.values(), key=lambda s: s.request_id)))
        seq.num_computed = len(seq)
        self.kv.commit(seq)
        seq.token_ids.append(data.draw(st.integers(0, 5)))
        try:
            self.kv.ensure_slots(seq, len(seq))
        except OutOfBlocks:
            self._drop(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), pin=st.booleans())
    def finish(self, data, pin):
        seq = data.draw(st.sampled_from(sorted(self.running.values(), key=lambda s: s.request_id)))
        if pin and seq.num_cached_blocks:
            blocks = self.kv.full_blocks(seq)
            self.pool.pin(seq.request_id, blocks, ttl_s=5.0, now=self.clock)
            self.pinned[seq.request_id] = [(b, self.pool.blocks[b].block_hash) for b in blocks]
        self._drop(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def abort(self, data):
        self._drop(data.draw(st.sampled_from(sorted(self.running.values(), key=lambda s: s.request_id))))

    @rule(dt=st.floats(0, 4))
    def time_passes(self, dt):
        self.clock += dt
        self.pool.expire_pins(now=self.clock)
        for sid in [s for s in self.pinned if s not in self.pool._pins]:
            del self.pinned[sid]

    def _drop(self, seq):
        self.kv.free(seq)
        del self.running[seq.request_id]

    @invariant()
    def in_use_and_pinned_blocks_are_never_evicted(self):
        check_invariants(self.pool)
        for seq in self.running.values():
            for i, block_id in enumerate(seq.block_table[: seq.num_cached_blocks]):
                # None only when another block published the same hash first (a duplicate).
                assert self.pool.blocks[block_id].block_hash in (seq.block_hashes[i], None)
                assert self.pool.blocks[block_id].ref_count >= 1
        for blocks in self.pinned.values():
            for block_id, h in blocks:
                assert self.pool.blocks[block_id].block_hash == h, "a pinned block was evicted"

    def teardown(self):
        for seq in list(self.running.values()):
            self._drop(seq)
        for sid in list(self.pool._pins):
            self.pool.unpin(sid)
        assert self.pool.num_free == self.pool.num_blocks, "blocks leaked"
        assert all(b.ref_count == 0 for b in self.pool.blocks)


# 20 runs x 50 steps = 1,000 random operations.
TestPoolProperties = PoolMachine.TestCase
TestPoolProperties.settings = settings(max_examples=20, stateful_step_count=50, deadline=None)


def test_block_hashes_of_a_sequence_match_hashing_module():
    pool = make_pool(n=8, bs=4)
    kv = KVCacheManager(pool)
    seq = Sequence("a", list(range(13)), SamplingParams(), hash_seed=SEED)
    kv.try_admit(seq)
    seq.num_computed = 13
    kv.commit(seq)
    assert seq.block_hashes == block_hashes(list(range(13)), 4, SEED)
    assert pool.cached_prefix(seq.block_hashes) == seq.block_table[:3]


def test_block_hashes_that_came_with_the_request_are_used_and_extended_not_recomputed():
    pool = make_pool(n=8, bs=4)
    kv = KVCacheManager(pool)
    given = block_hashes(list(range(8)), 4, hash_seed("the-gateway's-seed"))
    seq = Sequence("a", list(range(10)), SamplingParams(), hash_seed=SEED, block_hashes=list(given))
    kv.try_admit(seq)
    seq.token_ids += [10, 11]
    seq.num_computed = 12
    kv.commit(seq)
    assert seq.block_hashes[:2] == given  # the gateway's hashes name the prompt's blocks
    assert seq.block_hashes[2] == block_hashes(list(range(12)), 4, hash_seed("the-gateway's-seed"))[2]
    assert pool.cached_prefix(given) == seq.block_table[:2]


def test_unpin_says_how_many_blocks_the_pin_held():
    pool = make_pool()
    pool.pin("s", pool.allocate(3), ttl_s=60)
    assert pool.unpin("s") == 3 and pool.unpin("s") == 0
