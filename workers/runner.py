"""Turns a scheduled batch into tensors, runs the model over the pool, returns logits."""

from __future__ import annotations

import torch

from workers.model import PagedCausalLM, StepInputs
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
        bs = self.block_size
        qmax = max(batch.query_lens)
        input_ids, starts, slot_blocks, slot_offsets, tables = [], [], [], [], []
        for seq, qlen in zip(batch.seqs, batch.query_lens):
            start = seq.num_computed
            ids = seq.token_ids[start : start + qlen]
            input_ids.append(ids + [0] * (qmax - qlen))
            starts.append(start)
            for pos in range(start, start + qlen):
                slot_blocks.append(seq.block_table[pos // bs])
                slot_offsets.append(pos % bs)
            tables.append(seq.block_table[: -(-(start + qlen) // bs)])
        max_blocks = max(len(t) for t in tables)
        dev = self.device
        query_lens = torch.tensor(batch.query_lens, device=dev)
        start_t = torch.tensor(starts, device=dev)
        q_idx = torch.arange(qmax, device=dev)
        positions = start_t[:, None] + q_idx[None, :]
        token_mask = q_idx[None, :] < query_lens[:, None]
        if len(batch.seqs) == 1:  # the model derives causality from the context length
            attn_mask = None
        else:
            key_idx = torch.arange(max_blocks * bs, device=dev)
            attn_mask = key_idx[None, None, :] <= positions[:, :, None]
            # Padding rows attend to key 0 only, so softmax never sees an all-masked row (no NaNs).
            attn_mask &= token_mask[:, :, None] | (key_idx == 0)[None, None, :]
            attn_mask = attn_mask[:, None]
        return StepInputs(
            input_ids=torch.tensor(input_ids, device=dev),
            positions=positions,
            query_lens=query_lens,
            slot_blocks=torch.tensor(slot_blocks, device=dev),
            slot_offsets=torch.tensor(slot_offsets, device=dev),
            token_mask=token_mask,
            block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], device=dev),
            attn_mask=attn_mask,
            kv_len=starts[0] + batch.query_lens[0],
            all_real=min(batch.query_lens) == qmax,
        )
