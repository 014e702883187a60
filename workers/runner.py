"""Turns a scheduled batch into one packed step, runs the model over the pool, returns logits."""

from __future__ import annotations

import torch

from workers.model import PagedCausalLM, PrefillChunk, StepInputs
from workers.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: PagedCausalLM, kv: torch.Tensor, block_size: int):
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.device = kv.device

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Compute K/V for the batch's new tokens and return next-token logits per sequence."""
        return self.model(self.prepare(batch), self.kv)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs, dev = self.block_size, self.device
        input_ids, positions, slot_blocks, slot_offsets, last = [], [], [], [], []
        decode_index, decode_tables, decode_lens, prefills = [], [], [], []
        for seq, qlen in zip(batch.seqs, batch.query_lens):
            start, first = seq.num_computed, len(input_ids)
            end = start + qlen
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table[: -(-end // bs)]
            for pos in range(start, end):
                slot_blocks.append(table[pos // bs])
                slot_offsets.append(pos % bs)
            last.append(len(input_ids) - 1)
            if qlen == 1:
                decode_index.append(first)
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(first, qlen, end, torch.tensor(table, device=dev)))
        width = max((len(t) for t in decode_tables), default=0)
        return StepInputs(
            input_ids=torch.tensor(input_ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            slot_blocks=torch.tensor(slot_blocks, device=dev),
            slot_offsets=torch.tensor(slot_offsets, device=dev),
            last_token_index=torch.tensor(last, device=dev),
            decode_index=torch.tensor(decode_index, dtype=torch.long, device=dev),
            decode_tables=torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=dev).view(len(decode_tables), width),
            decode_lens=torch.tensor(decode_lens, dtype=torch.long, device=dev),
            prefills=prefills,
        )
