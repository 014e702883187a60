"""The sessions the simulations play (bench/plan.py, bench/simulate.py): agent sessions and
Mooncake traces as calls with real token ids and block hashes, and the reuse an ideal cache finds.

Token ids are drawn at random from the model's vocabulary (a whole prompt is only ever compared
block for block, by its hashes), and hashed with kvstore.hashing as the gateway hashes prompts.
"""

from __future__ import annotations

import msgspec
import numpy as np

from bench.agent.mooncake import TraceRecord, replay_plan
from bench.agent.workload import AgentWorkload
from bench.workersim import Call, SimSession
from kvstore.hashing import block_hashes, hash_seed

VOCAB = 49152  # SmolLM2's
TEMPLATE_TOKENS = 12  # the chat template's tokens around each new message (SmolLM2's)
TOOL_SCHEMA_TOKENS = 40  # one tool's schema in the system prompt
CHAIN_SEED = hash_seed("simulate")


def agent_sessions(w: AgentWorkload, count: int, rate_per_s: float, block_size: int, seed: int = 0) -> list[SimSession]:
    """`count` agent sessions arriving as a Poisson process: one shared system prompt, a task each,
    and every later call the whole conversation so far plus the reply, a tool output and user text."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(0, VOCAB, n).tolist()  # noqa: E731
    system = ids(w.system_words + TOOL_SCHEMA_TOKENS * w.tools)
    starts = np.concatenate(([0.0], np.cumsum(rng.exponential(1 / rate_per_s, count - 1))))
    sessions = []
    for i in range(count):
        prompt = system + ids(w.task_words + TEMPLATE_TOKENS)
        calls = []
        for _ in range(w.turns):
            calls.append(Call(len(prompt), w.max_tokens, len(prompt), block_hashes(prompt, block_size, CHAIN_SEED)))
            prompt = prompt + ids(w.max_tokens + w.tool_output_words + w.user_words + TEMPLATE_TOKENS)
        think = rng.exponential(w.think_time_s, w.turns - 1).tolist() if w.think_time_s else [0.0] * (w.turns - 1)
        sessions.append(SimSession(f"s{i}", float(starts[i]), calls, think))
    return sessions


def trace_sessions(records: list[TraceRecord], block_size: int, *, time_scale: float = 1.0, length_scale: float = 1.0,
                   max_requests: int | None = None) -> list[SimSession]:  # fmt: skip
    """A Mooncake trace, one call per request at its (scaled) time; requests naming the same hash
    ids share those blocks' tokens, as in the trace (bench/agent/mooncake.py)."""
    tokens: dict[int, list[int]] = {}

    def block_tokens(hash_id: int, n: int) -> list[int]:
        if hash_id not in tokens:
            tokens[hash_id] = np.random.default_rng([7, hash_id]).integers(0, VOCAB, 4096).tolist()
        return tokens[hash_id][:n]

    sessions = []
    for r in replay_plan(records, length_scale=length_scale, time_scale=time_scale, max_requests=max_requests):
        prompt = [t for h, k in r.blocks for t in block_tokens(h, k)]
        sessions.append(SimSession(r.id, r.at_s, [Call(len(prompt), r.max_tokens, len(prompt), block_hashes(prompt, block_size, CHAIN_SEED))], []))
    return sessions


def reuse_ceiling(sessions: list[SimSession], block_size: int) -> dict[tuple[str, int], int]:
    """Per call, the tokens an ideal cache (infinite, shared by every node) would hold: its longest
    prefix of blocks that an earlier call sent (of its own session, or of one that started before),
    leaving the last prompt token to compute."""
    seen: set[int] = set()
    ceiling: dict[tuple[str, int], int] = {}
    calls = sorted(((s.start_s, j, k, s.id, c) for j, s in enumerate(sessions) for k, c in enumerate(s.calls)), key=lambda x: x[:3])
    for _, _, k, sid, call in calls:
        held = next((i for i, h in enumerate(call.block_hashes) if h not in seen), len(call.block_hashes))
        ceiling[(sid, k + 1)] = min(held * block_size, call.prompt_tokens - 1)
        seen.update(call.block_hashes)
    return ceiling


def with_ideal_reuse(sessions: list[SimSession], block_size: int) -> list[SimSession]:
    """The same sessions, each call prefilling only what the ideal cache lacks (the planner's view:
    prefix-aware routing with transfers gets close to it, `agentkv bench simulate` measures how close)."""
    ceiling = reuse_ceiling(sessions, block_size)
    return [
        msgspec.structs.replace(s, calls=[msgspec.structs.replace(c, new_tokens=c.prompt_tokens - ceiling[(s.id, k + 1)])
                                          for k, c in enumerate(s.calls)])
        for s in sessions
    ]  # fmt: skip
