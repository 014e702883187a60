"""vLLM's KV events translated into agentkv's, so the index and the publisher stay engine-agnostic.

vLLM names a block by its own (sha256-based) hash; agentkv's index and gateway name it by the
chained xxh3 of kvstore.hashing. Each BlockStored event carries the blocks' token ids and the vLLM
hash of the parent of its first block, so the agentkv hash follows from the parent's mapped hash
(or, for a chain's first block, from the seed of the model and the cache salt vLLM puts in that
block's `extra_keys`). A block whose parent is unknown here (its event was lost) is skipped: the
router just misses it. vLLM may hold the same content twice (two physical copies), each removed on
its own, so copies are counted and a removal reaches the index only when the last copy goes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

from kvstore.events import AllCleared, BlockRemoved, BlockStored, KVEvent
from kvstore.hashing import hash_block, hash_seed
from workers.backend import CacheSnapshot

_decode_batch = msgspec.msgpack.Decoder().decode


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """A ZMQ message's msgpack payload, `[timestamp, [event maps], dp_rank]`, as its events."""
    return _decode_batch(payload)[1]


class EventMirror:
    """vLLM hash -> [agentkv hash, agentkv parent hash, copies], for every block vLLM caches."""

    def __init__(self, model_fingerprint: str, block_size: int) -> None:
        self.fingerprint, self.block_size = model_fingerprint, block_size
        self.blocks: dict[int, list] = {}
        self.held: Counter[int] = Counter()  # agentkv hash -> vLLM blocks with that content

    def cached_prefix(self, hashes: list[int]) -> int:
        """How many leading blocks of a prompt (agentkv hashes) vLLM holds: what its prefix cache finds."""
        return next((n for n, h in enumerate(hashes) if h not in self.held), len(hashes))

    def translate(self, events: list[dict[str, Any]]) -> list[KVEvent]:
        out: list[KVEvent] = []
        for event in events:
            kind = event.get("type")
            if kind == "BlockStored" and event.get("medium", "GPU") == "GPU":  # "GPU" on vLLM's CPU build too
                if (stored := self._stored(event)) is not None:
                    out.append(stored)
            elif kind == "BlockRemoved" and event.get("medium", "GPU") == "GPU":
                if removed := self._removed(event["block_hashes"]):
                    out.append(BlockRemoved(removed))
            elif kind == "AllBlocksCleared":
                self.blocks.clear()
                self.held.clear()
                out.append(AllCleared())
        return out

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot([(h, parent) for h, parent, _ in self.blocks.values()])

    def _stored(self, event: dict[str, Any]) -> BlockStored | None:
        vllm_parent = event.get("parent_block_hash")
        if vllm_parent is None:
            keys = (event.get("extra_keys") or [None])[0] or []
            salt = next((k for k in keys if isinstance(k, str)), "")  # the request's cache_salt
            parent, chain = None, hash_seed(self.fingerprint, salt)
        elif (entry := self.blocks.get(vllm_parent)) is not None:
            parent = chain = entry[0]
        else:
            return None
        tokens, size = event["token_ids"], event.get("block_size") or self.block_size
        hashes = []
        for n, vllm_hash in enumerate(event["block_hashes"]):
            child = hash_block(chain, tokens[n * size : (n + 1) * size])
            if (entry := self.blocks.get(vllm_hash)) is not None:
                entry[2] += 1
            else:
                self.blocks[vllm_hash] = [child, chain if n or parent is not None else None, 1]
                self.held[child] += 1
            hashes.append(chain := child)
        return BlockStored(hashes, parent_hash=parent)

    def _removed(self, vllm_hashes: list[int]) -> list[int]:
        gone = []
        for vllm_hash in vllm_hashes:
            entry = self.blocks.get(vllm_hash)
            if entry is not None:
                entry[2] -= 1
                if entry[2] == 0:
                    del self.blocks[vllm_hash]
                    self.held[entry[0]] -= 1
                    if not self.held[entry[0]]:
                        del self.held[entry[0]]
                        gone.append(entry[0])
        return gone
