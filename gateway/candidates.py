"""The nodes one routing decision prices, as columns.

The cost function (gateway.router.choose_route) reads a few numbers per node: blocks of the prompt it
holds, its running + waiting sequences (corrected by this gateway's own turns), its waiting ones, its
free and total blocks, its idle sessions and its role. Here they are numpy arrays over every
candidate, rows in node id order (ids break ties), so one decision prices 256 nodes in a few dozen
array operations instead of a Python loop per node.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec
import numpy as np

from kvstore.index import LiveRows, Matches
from kvstore.nodes import NodeLoad, NodeRecord


class Candidate(msgspec.Struct, frozen=True, gc=False):
    """One node as a decision sees it: how tests write a cluster (Candidates.of)."""

    record: NodeRecord
    load: NodeLoad
    cached_blocks: int = 0
    idle_sessions: int = 0  # this gateway's sessions between calls whose last turn ran here (LoadTracker.idle)

    @property
    def node_id(self) -> str:
        return self.record.node_id


@dataclass(eq=False)
class Candidates:
    """Columns over the candidate nodes. `rows` maps each candidate to its row in `table` (every
    node the lookup saw, in node id order, with its record), so ties and affinity are found by row
    number without reading an id per node."""

    table: LiveRows
    rows: np.ndarray
    cached_blocks: np.ndarray
    seqs: np.ndarray  # running + waiting
    waiting: np.ndarray
    free_blocks: np.ndarray
    total_blocks: np.ndarray
    idle: np.ndarray
    prefill_capable: np.ndarray
    decode_capable: np.ndarray
    handover_tokens: np.ndarray  # what adopting another node's prefill costs each (NodeRecord)

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, i: int) -> NodeRecord:
        return self.table.records[self.rows[i]]

    def index_of(self, node_id: str | None) -> int:
        """The candidate index of `node_id`, -1 if it is not a candidate."""
        r = self.table.row_of_id.get(node_id, -1) if node_id is not None else -1
        i = int(np.searchsorted(self.rows, r))
        return i if r >= 0 and i < len(self.rows) and self.rows[i] == r else -1

    def tie_rank(self, after: str | None) -> np.ndarray:
        """Each candidate's place in tie order: node ids after `after` first, then the rest, each
        ascending (rows are in id order, so the ids <= `after` are the rows below bisect's point)."""
        if after is None:
            return self.rows
        split = bisect.bisect_right(self.table.ids, after)
        return np.where(self.rows < split, self.rows + len(self.table), self.rows)

    @classmethod
    def from_matches(cls, found: Matches, *, exclude: Iterable[str] = (), flying: np.ndarray | None = None,
                     ended: np.ndarray | None = None, idle: np.ndarray | None = None) -> Candidates:  # fmt: skip
        """The usable nodes of a lookup but `exclude`, with this gateway's own turns per row: in flight
        (`flying`), ended within a report's possible age (`ended`), and its idle sessions (`idle`).
        A node reports running + waiting up to a heartbeat late: it still counts turns that have
        ended since and misses turns sent since, so running + waiting = max(own in flight, reported -
        own ended); other gateways' turns stay in the reported part."""
        table, usable = found.rows, found.usable
        n = len(table)
        zeros = np.zeros(n, dtype=np.int64)
        flying, ended, idle = (zeros if a is None else a for a in (flying, ended, idle))
        if exclude and (at := [r for node_id in exclude if (r := table.row_of_id.get(node_id)) is not None]):
            usable = usable.copy()
            usable[at] = False
        seqs = np.maximum(flying, table.running + table.waiting - ended)  # untouched rows: reported as is
        waiting = np.minimum(table.waiting, seqs)
        sel = slice(None) if usable.all() else np.flatnonzero(usable)
        return cls(table, np.arange(n)[sel], cached_blocks=found.matched[sel],
                   seqs=seqs[sel], waiting=waiting[sel], free_blocks=table.free_blocks[sel], total_blocks=table.total_blocks[sel],
                   idle=idle[sel], prefill_capable=table.prefill_capable[sel], decode_capable=table.decode_capable[sel],
                   handover_tokens=table.handover_tokens[sel])  # fmt: skip

    @classmethod
    def of(cls, candidates: list[Candidate]) -> Candidates:
        """From one Candidate per node (tests write clusters this way)."""
        found = Matches.of((c.record, c.load, c.cached_blocks) for c in candidates)
        idle = {c.node_id: c.idle_sessions for c in candidates}
        return cls.from_matches(found, idle=np.array([idle[node_id] for node_id in found.rows.ids], dtype=np.int64))
