"""Token selection: greedy, or temperature / top-k / top-p sampling with an optional per-request seed,
after OpenAI's logit adjustments (presence and frequency penalties on the reply's tokens, logit_bias)."""

from __future__ import annotations

import torch

from workers.sequence import Sequence


def adjust(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The logits with each row's penalties and bias applied (a copy only when some row has them), as
    OpenAI defines them: logit - presence_penalty * [token in reply] - frequency_penalty * count + bias."""
    rows = [r for r, seq in enumerate(seqs) if _adjusts(seq.sampling)]
    if not rows:
        return logits
    logits = logits.clone()
    for row in rows:
        params, output = seqs[row].sampling, seqs[row].output_ids
        if output and (params.presence_penalty or params.frequency_penalty):
            reply = torch.tensor(output, device=logits.device)
            counts = torch.bincount(reply, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
            logits[row] -= params.presence_penalty * (counts > 0).to(logits.dtype) + params.frequency_penalty * counts
        if bias := [(t, b) for t, b in params.logit_bias.items() if 0 <= t < logits.shape[-1]]:  # the gateway checked the ids
            ids, values = zip(*bias)
            at = torch.tensor(ids, dtype=torch.long, device=logits.device)
            logits[row, at] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return logits


def _adjusts(params) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.logit_bias)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """Next token per row and its log-probability under the model (before adjustments and temperature,
    as vLLM reports it)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    logits = adjust(logits, seqs)
    greedy = logits.argmax(dim=-1)
    tokens: list[int] = []
    for row, seq in enumerate(seqs):
        params = seq.sampling
        if params.temperature <= 0:
            tokens.append(int(greedy[row]))
            continue
        # Shifted so the best score is 0, and the temperature kept within float32's range: a temperature
        # as small as 5e-324 (a valid float; 0 in float32) gives scores of 0 and -inf, the greedy limit,
        # instead of 0 / 0 = NaN.
        temperature = max(params.temperature, torch.finfo(logits.dtype).tiny)
        scores = (logits[row] - logits[row].max()) / temperature
        if params.top_k > 0:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if seq.generator is None and params.seed is not None:
            seq.generator = torch.Generator(logits.device).manual_seed(params.seed)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            drop[0] = False  # a top_p under float32's smallest value rounds to 0 and would drop every token
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    chosen = logprobs[torch.arange(len(seqs)), torch.tensor(tokens)]
    return tokens, chosen.tolist()
