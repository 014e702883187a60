"""Replaying traces in the Mooncake format: one JSON object per line,

    {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [int, ...]}

where `hash_ids[i]` names the i-th block of `trace_block_tokens` (512 in Mooncake's traces) prompt
tokens and equal ids mean equal blocks. We rebuild prompts with exactly that sharing: each id
becomes a fixed run of one-token words (seeded by the id and the run's nonce), a prompt is its
blocks' words cut at `input_length`. Lengths (blocks included) and time are scaled so a
production trace fits a small machine. Prompts go to /v1/completions as text: no chat template,
so the sharing the trace describes is the sharing the server sees.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import msgspec
import numpy as np

from bench.agent.workload import WORDS

SAMPLE_TRACE = Path(__file__).with_name("sample_mooncake.jsonl")


class TraceRecord(msgspec.Struct, frozen=True):
    timestamp: float  # milliseconds from the trace's start
    input_length: int
    output_length: int
    hash_ids: list[int]


class ReplayRequest(msgspec.Struct, frozen=True):
    id: str
    at_s: float
    prompt: str
    prompt_tokens: int  # words, one token each
    max_tokens: int
    blocks: list[tuple[int, int]]  # (hash id, tokens of that block this prompt covers)


class TraceError(ValueError):
    """The trace file is not in the Mooncake format; the message names the line."""


def load_trace(path: str | Path) -> list[TraceRecord]:
    decode = msgspec.json.Decoder(TraceRecord).decode
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(decode(line))
        except msgspec.DecodeError as exc:
            raise TraceError(f"{path}:{n}: not a Mooncake trace record ({exc})") from None
    return records


def replay_plan(
    records: list[TraceRecord],
    *,
    length_scale: float = 1.0,
    output_scale: float | None = None,
    time_scale: float = 1.0,
    trace_block_tokens: int = 512,
    max_requests: int | None = None,
    nonce: str = "",
) -> list[ReplayRequest]:
    """Requests in arrival order, times relative to the first record.

    `length_scale` shrinks prompts and blocks alike (so sharing is kept block for block),
    `output_scale` the outputs (default: `length_scale`), `time_scale` the gaps between arrivals.
    """
    block = max(1, round(trace_block_tokens * length_scale))
    out_scale = length_scale if output_scale is None else output_scale
    ordered = sorted(records, key=lambda r: r.timestamp)[:max_requests]
    if not ordered:
        return []
    t0 = ordered[0].timestamp
    salt = zlib.crc32(nonce.encode())
    words: dict[int, list[str]] = {}

    def block_words(hash_id: int) -> list[str]:
        if hash_id not in words:
            rng = np.random.default_rng([salt, hash_id])
            words[hash_id] = [WORDS[i] for i in rng.integers(0, len(WORDS), block)]
        return words[hash_id]

    requests = []
    for n, r in enumerate(ordered):
        length = min(max(1, round(r.input_length * length_scale)), block * len(r.hash_ids))
        blocks = [(h, min(block, length - i * block)) for i, h in enumerate(r.hash_ids) if length > i * block]
        text = " ".join(w for h, k in blocks for w in block_words(h)[:k])
        requests.append(ReplayRequest(
            id=f"trace-{nonce}-{n}", at_s=(r.timestamp - t0) / 1000.0 * time_scale, prompt=text, prompt_tokens=length,
            max_tokens=max(1, round(r.output_length * out_scale)), blocks=blocks,
        ))  # fmt: skip
    return requests


def reusable_tokens(requests: list[ReplayRequest], block_size: int) -> list[int]:
    """Per request, the prefix an ideal cache (infinite, shared by all nodes) would hold when it is
    sent: the longest token prefix it shares with any earlier request, in whole cache blocks of
    `block_size`, leaving at least the last prompt token to compute."""
    seen: dict[tuple[int, ...], int] = {}  # block-id path -> most tokens of its last block seen
    out = []
    for req in requests:
        shared, path, still_equal = 0, (), True
        for h, k in req.blocks:
            path = (*path, h)
            if still_equal:
                before = seen.get(path, 0)
                shared += min(before, k)
                still_equal = before >= k  # an earlier prompt stopped inside this block: the rest differs
            seen[path] = max(seen.get(path, 0), k)
        out.append(min(shared, req.prompt_tokens - 1) // block_size * block_size)
    return out
