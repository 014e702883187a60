"""The simulations' sessions: agent conversations and Mooncake traces as hashed calls, and the
reuse an ideal shared cache would find, by hand."""

from __future__ import annotations

import pytest

from bench.agent.mooncake import TraceRecord
from bench.agent.workload import AgentWorkload
from bench.simworkload import agent_sessions, reuse_ceiling, trace_sessions, with_ideal_reuse
from bench.workersim import Call, SimSession

SMALL = AgentWorkload(sessions=0, turns=3, system_words=60, tools=1, task_words=8, tool_output_words=40, user_words=4, max_tokens=4)


def test_agent_sessions_extend_their_own_prompt_and_share_the_system_prompt():
    sessions = agent_sessions(SMALL, 3, rate_per_s=2.0, block_size=16)
    for s in sessions:
        assert [c.prompt_tokens for c in s.calls] == [120, 180, 240]  # 100 system + 20 task, then + 4 + 40 + 4 + 12
        for earlier, later in zip(s.calls, s.calls[1:]):
            assert later.block_hashes[: len(earlier.block_hashes)] == earlier.block_hashes
    firsts = [s.calls[0].block_hashes for s in sessions]
    assert firsts[0][:6] == firsts[1][:6] == firsts[2][:6]  # 100 system tokens: 6 whole blocks
    assert len({f[6] for f in firsts}) == 3  # then each session's task


def test_poisson_arrivals_scale_with_the_rate():
    slow, fast = agent_sessions(SMALL, 5, 1.0, 16), agent_sessions(SMALL, 5, 4.0, 16)
    assert [s.start_s / 4 for s in slow] == pytest.approx([s.start_s for s in fast])


def test_reuse_ceiling_is_the_longest_prefix_any_earlier_call_sent():
    a = SimSession("a", 0.0, [Call(48, 1, 48, [1, 2, 3]), Call(80, 1, 80, [1, 2, 3, 4, 5])], [0.0])
    b = SimSession("b", 1.0, [Call(40, 1, 40, [1, 9])], [])
    assert reuse_ceiling([b, a], 16) == {("a", 1): 0, ("a", 2): 48, ("b", 1): 16}
    same = SimSession("c", 0.0, [Call(32, 1, 32, [1, 2]), Call(32, 1, 32, [1, 2])], [0.0])
    assert reuse_ceiling([same], 16)[("c", 2)] == 31  # the last prompt token is always computed


def test_with_ideal_reuse_prefills_only_what_the_ideal_cache_lacks():
    sessions = with_ideal_reuse(agent_sessions(SMALL, 2, 1.0, 16), 16)
    first, second = sessions
    assert [c.new_tokens for c in first.calls] == [120, 180 - 112, 240 - 176]  # whole blocks of the previous prompt
    assert second.calls[0].new_tokens == 120 - 96  # the system prompt's 6 blocks came from the first session


def test_trace_requests_share_the_blocks_their_hash_ids_share():
    records = [TraceRecord(0, 1200, 5, [1, 2, 3]), TraceRecord(1000, 1100, 5, [1, 2, 9]), TraceRecord(3000, 300, 5, [7])]
    sessions = trace_sessions(records, 16, time_scale=0.5)
    assert [s.start_s for s in sessions] == [0.0, 0.5, 1.5]
    assert [s.calls[0].prompt_tokens for s in sessions] == [1200, 1100, 300]
    ceiling = reuse_ceiling(sessions, 16)
    assert [ceiling[(s.id, 1)] for s in sessions] == [0, 1024, 0]  # two 512-token blocks in common
