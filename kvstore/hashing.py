"""Chained block hashes: the one definition every node and the gateway share.

h_i = xxh3_64(h_{i-1} as 8 little-endian bytes || block token ids as little-endian u32),
h_{-1} = seed(model fingerprint, tenant salt). Only full blocks are hashed, so a hash names a
whole prefix: equal hash at block i means equal tokens in blocks 0..i (barring collisions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

_U64 = (1 << 64) - 1


def hash_seed(model_fingerprint: str, salt: str = "") -> int:
    """The chain's starting value; a different model or tenant gives disjoint hashes."""
    return xxhash.xxh3_64_intdigest(f"agentkv/v1\0{model_fingerprint}\0{salt}".encode())


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given the hash of the block before it."""
    payload = (parent & _U64).to_bytes(8, "little") + np.asarray(token_ids, dtype="<u4").tobytes()
    return xxhash.xxh3_64_intdigest(payload)


def block_hashes(token_ids: Sequence[int], block_size: int, seed: int) -> list[int]:
    """Hashes of every full block of `token_ids`; a trailing partial block is not hashed."""
    return extend_block_hashes([], token_ids, block_size, seed)


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, seed: int) -> list[int]:
    """Append the hashes of blocks completed since `hashes` was computed (incremental, O(new blocks))."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    parent = hashes[-1] if hashes else seed
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
