"""The worker model (bench/workersim.py) by hand, and the planner (bench/plan.py) on toy workloads
whose best prefill:decode split is known analytically."""

from __future__ import annotations

import json

import pytest

from bench.agent.metrics import Slo
from bench.agent.workload import AgentWorkload
from bench.plan import plan, run
from bench.workersim import Calibration, Call, Cluster, SimSession, Split

# Round numbers: a prefill of n tokens takes n ms, a decode step 10 ms + 1 ms per sequence.
CAL = Calibration(prefill_s_per_token=0.001, prefill_overhead_s=0.0, step_base_s=0.01, step_per_seq_s=0.001,
                  transfer_overhead_s=0.002, transfer_s_per_block=0.001, block_size=16, prefill_threshold_tokens=64)  # fmt: skip


def test_one_call_on_one_worker_by_hand():
    [o] = Cluster(1, CAL, Split(0, CAL)).run([SimSession("a", 1.0, [Call(100, 4)], [])])
    assert o.sent_s == 1.0 and o.ttft_s == pytest.approx(0.1)  # the prefill emits the first token
    assert o.itl_s == pytest.approx([0.011] * 3) and o.output_tokens == 4
    assert o.e2e_s == pytest.approx(0.1 + 3 * 0.011)


def test_a_long_prompt_goes_to_the_prefill_worker_and_its_kv_moves():
    [o] = Cluster(2, CAL, Split(1, CAL)).run([SimSession("a", 0.0, [Call(160, 3)], [])])
    assert o.ttft_s == pytest.approx(0.16)
    assert o.itl_s[0] == pytest.approx(0.002 + 10 * 0.001 + 0.011)  # transfer of 10 blocks, then a step
    [short] = Cluster(2, CAL, Split(1, CAL)).run([SimSession("b", 0.0, [Call(64, 2)], [])])
    assert short.ttft_s == pytest.approx(0.064) and short.itl_s == pytest.approx([0.011])  # local prefill


def test_a_colocated_prefill_stalls_the_running_batch():
    sessions = [SimSession("a", 0.0, [Call(10, 20)], []), SimSession("b", 0.05, [Call(500, 2)], [])]
    colocated = {o.id: o for o in Cluster(1, CAL, Split(0, CAL)).run(sessions)}
    assert max(colocated["a"].itl_s) >= 0.5  # b's 0.5 s prefill ran between two of a's steps
    split = {o.id: o for o in Cluster(2, CAL, Split(1, CAL)).run(sessions)}
    assert max(split["a"].itl_s) < 0.02


def test_sessions_run_their_calls_in_order_after_the_tool_time():
    outcomes = Cluster(1, CAL, Split(0, CAL)).run([SimSession("a", 0.0, [Call(10, 1), Call(20, 1)], [2.0])])
    first, second = sorted(outcomes, key=lambda o: o.turn)
    assert second.sent_s == pytest.approx(first.sent_s + first.e2e_s + 2.0)


def test_calibration_fits_the_engine_bench():
    steps = {1: 0.04 + 0.004, 8: 0.04 + 0.032, 32: 0.04 + 0.128}
    cal = Calibration.from_engine_bench({"decode_tok_s": {str(b): b / s for b, s in steps.items()}, "prefill_tok_s": 500.0})
    assert cal.step_base_s == pytest.approx(0.04) and cal.step_per_seq_s == pytest.approx(0.004)
    assert cal.prefill_s_per_token == pytest.approx(0.002)


# Decode is free and never stalls; a prompt takes 0.5 s of prefill and emits one token.
PREFILL_BOUND = Calibration(prefill_s_per_token=0.001, prefill_overhead_s=0.0, step_base_s=0.01, step_per_seq_s=0.0,
                            transfer_overhead_s=0.0, transfer_s_per_block=0.0, prefill_threshold_tokens=64)  # fmt: skip


def _toy(output_tokens: int):
    return lambda rate: [SimSession(f"s{i}", i / rate, [Call(500, output_tokens)], []) for i in range(40)]


def test_planner_prefill_only_work_wants_every_worker_prefilling():
    """Capacity is (workers that prefill) x 2 prompts/s: colocated has 4, kP:(4-k)D has k."""
    candidates = plan(4, _toy(1), PREFILL_BOUND, Slo(ttft_s=0.6, itl_p99_s=0.1), lo=0.1, hi=1.0)
    assert candidates[0].name == "colocated x4"
    splits = {c.prefill: c.max_rate_per_s for c in candidates}
    assert splits[0] > splits[3] > splits[2] > splits[1]
    assert splits[3] == pytest.approx(6.0, rel=0.25)  # 3 prefill workers, 0.5 s each


def test_planner_itl_bound_work_wants_one_decoder_and_the_rest_prefilling():
    """A 0.5 s prefill on a worker that decodes breaks every running sequence's ITL objective, so a
    colocated worker serves one request at a time: 0.5 s prefill + 50 steps of 10 ms, 4 workers ->
    4 requests/s. One decoder handles any batch, so kP:(4-k)D serves 2k/s: 3P:1D (6/s) is best."""
    candidates = plan(4, _toy(50), PREFILL_BOUND, Slo(ttft_s=0.6, itl_p99_s=0.1), lo=0.1, hi=1.0)
    assert candidates[0].name == "3P:1D"
    splits = {c.prefill: c.max_rate_per_s for c in candidates}
    assert splits[3] > splits[2] > splits[1] and splits[3] > splits[0]
    assert splits[3] == pytest.approx(6.0, rel=0.25) and splits[0] == pytest.approx(4.0, rel=0.25)


def test_plan_result_is_json_with_every_split_and_a_plot(tmp_path):
    w = AgentWorkload(sessions=1, turns=2, task_words=10, tool_output_words=20, user_words=2, max_tokens=4)
    result = run(3, workload=w, cal=CAL, sessions_per_worker=3, out_dir=tmp_path)
    assert [c["split"] for c in result["candidates"]].count("colocated x3") == 1
    assert {c["split"] for c in result["candidates"]} == {"colocated x3", "1P:2D", "2P:1D"}
    assert result["best"] == result["candidates"][0]["split"] and json.loads(json.dumps(result)) == result
    with open(result["plot"], "rb") as f:
        assert f.read(4) == b"\x89PNG"
    with pytest.raises(ValueError):
        plan(0, _toy(1))
