"""`agentkv bench simulate`: the pool model by hand, and the real router on a
real Valkey index driving simulated workers (the index must mirror the simulated pools exactly)."""

from __future__ import annotations

import os

import pytest

from bench import cores
from bench.agent.workload import AgentWorkload
from bench.simulate import POLICIES, Policy, Pool, Scale, _register, run
from bench.simworkload import agent_sessions
from bench.workersim import Calibration, Cluster
from kvstore.valkey import connect

SMALL = AgentWorkload(sessions=0, turns=3, system_words=60, tools=1, task_words=8, tool_output_words=40, user_words=4,
                      max_tokens=4, think_time_s=0.2)  # fmt: skip


def test_pool_evicts_least_recently_used_and_a_prefix_outlives_its_extensions():
    pool = Pool(capacity=4)
    assert pool.store([1, 2, 3]) == (0, [])
    assert pool.store([1, 2, 3, 4, 5]) == (3, [5])  # 5 was touched first (tail first), so it goes first
    assert pool.held([1, 2, 3, 4]) == 4 and pool.held([1, 2, 9]) == 2
    assert pool.store([7]) == (0, [4])
    assert pool.held([1, 2, 3]) == 3


@pytest.mark.heavy
def test_the_index_mirrors_the_simulated_pools_exactly(valkey_url, aio):
    """The real router (choose_route) over the real index: after the run, a lookup of every call's
    prompt gives, per node, exactly the prefix that node's simulated pool holds."""
    redis = aio.run(connect(valkey_url))
    cal = Calibration()
    try:
        index, records = aio.run(_register(redis, "simtest", 3, cal, Scale(capacity_blocks=24)))
        sessions = agent_sessions(SMALL, 6, rate_per_s=4.0, block_size=cal.block_size)
        policy = Policy("prefix_aware", records, cal, Scale(capacity_blocks=24), index, aio)
        outcomes = Cluster(3, cal, policy).run(sessions)
        assert len(outcomes) == 18 and all(o.ttft_s is not None and o.output_tokens == 4 for o in outcomes)
        assert any(len(p.blocks) == 24 for p in policy.pools)  # a pool filled up: evictions reached the index too
        for call in (c for s in sessions for c in s.calls):
            found = aio.run(index.lookup(call.block_hashes))
            assert {r.node_id: policy.pools[i].held(call.block_hashes) for i, r in enumerate(records)} == {
                r.node_id: found.get(r.node_id, 0) for r in records
            }
        assert len(policy.decision_s) == 18
    finally:
        aio.run(redis.aclose())


@pytest.mark.heavy
def test_a_small_run_of_every_policy(tmp_path):
    affinity = os.sched_getaffinity(0)
    result = run((2, 4), workload=SMALL, scale=Scale(sessions_per_node=2, session_rate_per_node_s=1.0, capacity_blocks=64),
                 fill_blocks=20_000, out_dir=tmp_path)  # fmt: skip
    policies = result["policies"]
    assert set(policies) == set(POLICIES) and all(set(by_n) == {"2", "4"} for by_n in policies.values())
    top = {name: by_n["4"] for name, by_n in policies.items()}
    assert all(m["requests"] == 4 * 2 * 3 for m in top.values())
    assert top["prefix_aware"]["filled_blocks"] == 20_000 and top["prefix_aware"]["indexed_blocks"] >= 20_000
    assert 20 < top["prefix_aware"]["redis_bytes_per_block"] < 400
    assert top["prefix_aware"]["reuse_of_ceiling"] >= top["random"]["reuse_of_ceiling"]
    assert top["prefix_aware_full"]["bytes_moved"] >= top["prefix_aware"]["bytes_moved"]
    assert top["sticky"]["bytes_moved"] == top["round_robin"]["bytes_moved"] == top["random"]["bytes_moved"] == 0
    assert set(result["targets"]) == {"prefix_aware_reuse_of_ceiling", "random_ttft_p90_over_prefix_aware", "prefix_aware_decision_p99_ms"}
    with open(result["plot"], "rb") as f:
        assert f.read(4) == b"\x89PNG"
    # Valkey shared the simulator's core during the run, and this process has its cores back after it.
    assert os.sched_getaffinity(0) == affinity
    assert result["valkey"]["on_the_simulators_core"] is cores.can_pin()
    if cores.can_pin():
        trips = result["valkey"]["round_trip_after_busy"]
        assert set(trips) == {"same_core", "other_core"}
        assert all(0 < t["p50_ms"] <= t["p99_ms"] for t in trips.values())


def test_sharing_a_core_pins_both_processes_and_restores_them():
    """Another process (Valkey in the benchmark) shares this process's first core inside the block;
    both get their cores back after it, also when the block raises."""
    import subprocess

    if not cores.can_pin():
        pytest.skip("one core, or no CPU affinity API: nothing to pin")
    child = subprocess.Popen(["sleep", "30"])
    try:
        mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(child.pid)
        with pytest.raises(RuntimeError), cores.sharing_a_core(child.pid) as core:
            assert core == min(mine)
            assert os.sched_getaffinity(0) == os.sched_getaffinity(child.pid) == {core}
            raise RuntimeError
        assert os.sched_getaffinity(0) == mine and os.sched_getaffinity(child.pid) == theirs
        with cores.sharing_a_core(child.pid, share=False) as core:
            assert core is None and os.sched_getaffinity(0) == mine
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("args", "message"), [
    (["--nodes", "4,x"], "--nodes: comma-separated positive node counts"),
    (["--nodes", "0"], "--nodes: comma-separated positive node counts"),
    (["--policy", "nope"], "--policy: unknown ['nope']"),
])  # fmt: skip
def test_the_cli_refuses_bad_options_in_one_line(args, message):
    from typer.testing import CliRunner

    from agentkv.cli import app

    result = CliRunner().invoke(app, ["bench", "simulate", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
