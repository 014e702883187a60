"""`agentkv bench agent`: workload generation, Mooncake replay, the driver's reading of a stream,
metric math against hand-computed values, the report; one tiny run against a real stack (heavy)."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec
import numpy as np
import pytest

from bench.agent import metrics, mooncake, report
from bench.agent.driver import Driver, DriveResult, Outcome
from bench.agent.mooncake import ReplayRequest, TraceRecord
from bench.agent.workload import WORDS, AgentWorkload, build_plan, messages_for, shared_prefix_tokens
from kvstore.wire import RouteStats

# ------------------------------------------------------------------------------------ workload


def test_plan_is_deterministic_except_for_the_nonce():
    w = AgentWorkload(sessions=3, turns=4, system_words=50, tool_output_words=30, user_words=5)
    a, b, c = build_plan(w, "x"), build_plan(w, "x"), build_plan(w, "y")
    assert a == b
    assert a.system != c.system and a.system.replace("run x", "run y") == c.system
    assert [s.appends for s in a.sessions] == [s.appends for s in c.sessions]


def test_sessions_share_the_system_prompt_and_differ_after_it():
    plan = build_plan(AgentWorkload(sessions=3, turns=2, system_words=40, tools=3), "n")
    firsts = [messages_for(plan, s, []) for s in plan.sessions]
    assert all(m[0] == {"role": "system", "content": plan.system} for m in firsts)
    assert len({m[1]["content"] for m in firsts}) == 3
    assert plan.warmup[0]["content"] == plan.system
    assert '"name": "search_docs"' in plan.system and '"name": "run_tests"' in plan.system
    assert '"name": "grep"' not in plan.system  # tools=3: the first three only


def test_each_turn_extends_the_previous_one_with_the_reply_and_a_tool_output():
    w = AgentWorkload(sessions=1, turns=3, system_words=10, tool_output_words=20, user_words=4)
    plan = build_plan(w, "n")
    script = plan.sessions[0]
    assert script.turns == 3 and len(script.appends) == 2
    t2 = messages_for(plan, script, ["first reply"])
    t3 = messages_for(plan, script, ["first reply", "second reply"])
    assert t3[: len(t2)] == t2
    assert t3[len(t2)] == {"role": "assistant", "content": "second reply"}
    assert t3[-1]["role"] == "user" and t3[-1]["content"].startswith("Tool ")
    assert len(t3[-1]["content"].split("returned:\n")[1].split("\n\n")[0].split()) == 20


def test_sizes_are_in_words_from_the_one_token_vocabulary():
    plan = build_plan(AgentWorkload(sessions=1, turns=1, task_words=37), "n")
    task = plan.sessions[0].task.split()
    assert len(task) == 37 and set(task) <= set(WORDS)


def test_closed_loop_starts_every_session_at_once_and_poisson_spreads_them():
    closed = build_plan(AgentWorkload(sessions=4), "n")
    assert [s.start_s for s in closed.sessions] == [0.0] * 4
    poisson = build_plan(AgentWorkload(sessions=200, turns=1, arrival="poisson", session_rate_per_s=2.0), "n")
    starts = np.array([s.start_s for s in poisson.sessions])
    assert starts[0] == 0.0 and np.all(np.diff(starts) >= 0)
    assert 0.35 < np.diff(starts).mean() < 0.65  # mean gap 1 / rate = 0.5 s


def test_think_times_are_fixed_in_closed_loop_and_exponential_under_poisson():
    closed = build_plan(AgentWorkload(sessions=2, turns=3, think_time_s=1.5), "n")
    assert [s.think_s for s in closed.sessions] == [[1.5, 1.5]] * 2
    poisson = build_plan(AgentWorkload(sessions=100, turns=3, arrival="poisson", think_time_s=2.0), "n")
    think = np.array([s.think_s for s in poisson.sessions])
    assert think.shape == (100, 2) and len(np.unique(think)) == 200 and 1.5 < think.mean() < 2.5


def test_long_documents_arrive_on_their_own_schedule():
    plan = build_plan(AgentWorkload(sessions=1, long_docs=3, long_doc_words=100, long_doc_start_s=1.0, long_doc_gap_s=4.0), "n")
    assert [d.at_s for d in plan.docs] == [1.0, 5.0, 9.0]
    assert len({d.messages[0]["content"] for d in plan.docs}) == 3
    assert all(d.messages[0]["content"].startswith(f"Document n-{i}") for i, d in enumerate(plan.docs))


def test_shared_prefix_is_the_common_start_of_warmup_and_first_turn():
    plan = build_plan(AgentWorkload(sessions=2, turns=1, system_words=10), "n")

    def encode(messages):  # a whitespace "tokenizer" over a ChatML-like rendering
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages).split()

    shared = shared_prefix_tokens(plan, encode)
    assert shared == {s.id: len(f"<system> {plan.system} <user>".split()) for s in plan.sessions}


# ------------------------------------------------------------------------------------ mooncake


def test_sample_trace_parses():
    records = mooncake.load_trace(mooncake.SAMPLE_TRACE)
    assert len(records) == 14
    assert records[0] == TraceRecord(timestamp=0, input_length=1499, output_length=96, hash_ids=[0, 1, 10])


def test_a_bad_line_names_itself(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{"timestamp": "x"}\n')
    with pytest.raises(mooncake.TraceError, match="t.jsonl:2"):
        mooncake.load_trace(path)


def test_replay_scales_lengths_blocks_and_time():
    records = [
        TraceRecord(timestamp=1000, input_length=1024, output_length=100, hash_ids=[7, 8]),
        TraceRecord(timestamp=3000, input_length=1300, output_length=40, hash_ids=[7, 8, 9]),
    ]
    reqs = mooncake.replay_plan(records, length_scale=1 / 16, time_scale=0.5, output_scale=0.5)
    assert [r.at_s for r in reqs] == [0.0, 1.0]  # 2000 ms later, at half speed of time
    assert [r.prompt_tokens for r in reqs] == [64, 81]  # 1024/16, round(1300/16)
    assert reqs[1].blocks == [(7, 32), (8, 32), (9, 17)]  # 512/16 tokens per block
    assert [r.max_tokens for r in reqs] == [50, 20]
    assert [len(r.prompt.split()) for r in reqs] == [64, 81]


def test_equal_hash_ids_give_equal_text_and_different_ids_differ():
    records = [
        TraceRecord(timestamp=0, input_length=96, output_length=1, hash_ids=[1, 2, 3]),
        TraceRecord(timestamp=1, input_length=96, output_length=1, hash_ids=[1, 2, 4]),
    ]
    a, b = (r.prompt.split() for r in mooncake.replay_plan(records, trace_block_tokens=32))
    assert a[:64] == b[:64] and a[64:] != b[64:]
    other = mooncake.replay_plan(records, trace_block_tokens=32, nonce="other")[0].prompt.split()
    assert other[:32] != a[:32]  # another run's nonce: no shared cache between modes


def test_replay_is_in_arrival_order_and_can_be_cut():
    records = [TraceRecord(timestamp=t, input_length=10, output_length=1, hash_ids=[t]) for t in (30, 10, 20)]
    reqs = mooncake.replay_plan(records, trace_block_tokens=16, max_requests=2)
    assert [r.blocks[0][0] for r in reqs] == [10, 20]


def test_reusable_tokens_by_hand():
    def req(blocks):
        return ReplayRequest(id="r", at_s=0, prompt="", prompt_tokens=sum(k for _, k in blocks), max_tokens=1, blocks=blocks)

    reqs = [
        req([(1, 32), (2, 32), (3, 20)]),  # nothing before it
        req([(1, 32), (2, 32), (3, 32), (4, 5)]),  # 32 + 32 + the 20 of block 3 seen; rest differs
        req([(1, 32), (2, 32), (3, 32), (4, 3)]),  # 96 + 3 of block 4, but the last token is kept: 98 -> 96
        req([(1, 32), (5, 32)]),  # only block 1
        req([(1, 32), (2, 32)]),  # a full hit: 64 - 1 = 63 -> 48
    ]
    assert mooncake.reusable_tokens(reqs, block_size=16) == [0, 80, 96, 32, 48]


# -------------------------------------------------------------------------------------- driver


def _sse(*events: dict | str) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choice = {"index": 0, "delta": {"content": content} if content is not None else {}, "finish_reason": finish}
    return {"choices": [choice] if usage is None else [], **({"usage": usage} if usage else {})}


def _drive(handler, work):
    async def go():
        async with Driver("http://test", model="m") as d:
            d.http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler))
            return await work(d)

    return asyncio.run(go())


STATS = RouteStats(decode_node="d0", prefill_node="p0", session_id="s", prompt_tokens=100, cached_tokens=64, prefilled_tokens=20,
                   transferred_tokens=16, transferred_blocks=1, transferred_bytes=4096, ledger="extended")  # fmt: skip
PLANNED = RouteStats(decode_node="d0", prefill_node="p0", session_id="s", source="planned")


def test_driver_reads_tokens_usage_and_the_route_header():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        seen["session"] = request.headers.get("x-session-id")
        usage = {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64},
                 "agentkv": msgspec.to_builtins(STATS)}
        body = _sse(_chunk(""), _chunk("a"), _chunk("b"), _chunk("c"), _chunk(finish="length"), _chunk(usage=usage), "[DONE]")
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream", "x-agentkv-route": PLANNED.to_header()})

    o = _drive(handler, lambda d: d.chat([{"role": "user", "content": "hi"}], 3, kind="turn", id="s", turn=2, session="s"))
    assert o.ok and o.text == "abc" and o.output_tokens == 3 and len(o.itl_s) == 2 and o.ttft_s is not None
    assert (o.prompt_tokens, o.cached_tokens, o.agentkv.prefilled_tokens, o.reused_tokens) == (100, 64, 20, 80)
    assert o.cache_reported
    assert o.agentkv == STATS and o.route == PLANNED
    assert seen["session"] == "s" and seen["body"]["stream"] is True and seen["body"]["temperature"] == 0.0
    assert seen["body"]["stream_options"] == {"include_usage": True}


def test_driver_records_failures_instead_of_raising():
    def http_error(request):
        return httpx.Response(400, json={"error": {"message": "too long"}})

    def stream_error(request):
        return httpx.Response(200, content=_sse(_chunk("a"), {"error": {"message": "worker died"}}),
                              headers={"content-type": "text/event-stream"})  # fmt: skip

    def truncated(request):
        return httpx.Response(200, content=_sse(_chunk("a")), headers={"content-type": "text/event-stream"})

    def refused(request):
        raise httpx.ConnectError("refused")

    errors = [_drive(h, lambda d: d.complete("x", 1, kind="replay", id="r")).error for h in (http_error, stream_error, truncated, refused)]
    assert errors[0].startswith("HTTP 400") and "too long" in errors[0]
    assert errors[1] == "stream error: worker died"
    assert errors[2] == "the stream ended without a finish_reason"
    assert errors[3].startswith("ConnectError")


def test_a_failed_turn_skips_the_rest_of_its_session():
    calls = []

    def handler(request):
        if request.method == "DELETE":
            return httpx.Response(404)
        calls.append(1)
        return httpx.Response(500, json={"error": {"message": "boom"}})

    plan = build_plan(AgentWorkload(sessions=1, turns=3, system_words=5, tool_output_words=5), "n")
    result = _drive(handler, lambda d: d.run_agent(plan))
    turns = [o for o in result.outcomes if o.kind == "turn"]
    assert len(calls) == 2  # warm-up and turn 1
    assert [o.error.startswith("skipped") for o in turns] == [False, True, True]


# ------------------------------------------------------------------------------------- metrics


def _turn(sid, turn, prompt, out, cached, prefilled=None, prefill_node=None, moved=0, **kw) -> Outcome:
    stats = None if prefilled is None else RouteStats(prefilled_tokens=prefilled, prefill_node=prefill_node, transferred_bytes=moved)
    return Outcome(kind="turn", id=sid, turn=turn, prompt_tokens=prompt, output_tokens=out, cached_tokens=cached, agentkv=stats,
                   ttft_s=kw.pop("ttft", 0.1), cache_reported=kw.pop("reported", True), **kw)  # fmt: skip


def test_agent_ceilings_by_hand():
    outcomes = [
        _turn("a", 1, 100, 10, 0),
        _turn("a", 2, 150, 10, 0),  # previous 100 + 10 - 1 = 109 -> 96 (block 16)
        _turn("a", 3, 170, 5, 0),  # 150 + 10 - 1 = 159 -> 144
        _turn("b", 1, 40, 5, 0),  # shared 90, but 40 - 1 = 39 -> 32
        Outcome(kind="turn", id="c", turn=1, error="x"),
    ]
    assert metrics.agent_ceilings(outcomes, {"a": 90, "b": 90}, 16) == {("a", 1): 80, ("a", 2): 96, ("a", 3): 144, ("b", 1): 32}


def test_summary_by_hand():
    outcomes = [
        Outcome(kind="warmup", id="w", prompt_tokens=50, output_tokens=1, ttft_s=9.0),
        _turn("a", 1, 100, 10, 64, 36, ttft=1.0, itl_s=[0.1, 0.3]),  # reused 64 of 80
        _turn("a", 2, 150, 10, 96, 54, ttft=2.0, itl_s=[0.2]),  # reused 96 of 96
        _turn("b", 1, 100, 4, 0, 100, ttft=3.0, itl_s=[]),  # reused 0 of 80
        Outcome(kind="turn", id="b", turn=2, error="boom"),
    ]
    ceilings = metrics.agent_ceilings(outcomes, {"a": 90, "b": 90}, 16)
    s = metrics.summarize(DriveResult(outcomes, duration_s=4.0), ceilings, 16, 1000)
    assert (s.requests, s.failed, s.output_tokens, s.out_tok_s) == (4, 1, 24, 6.0)
    assert s.ttft_p50_s == 2.0 and s.ttft_p90_s == pytest.approx(2.8) and s.ttft_p99_s == pytest.approx(2.98)
    assert s.itl_p50_s == pytest.approx(0.2) and s.itl_p99_s == pytest.approx(0.298)
    assert (s.reused_tokens, s.reusable_tokens) == (160, 256)
    assert s.reuse_ratio == pytest.approx(160 / 256) and s.decode_local_hit_rate == pytest.approx(160 / 256)
    assert s.bytes_moved_ratio is None and s.transfer_requests == 0
    assert s.errors == ["turn b#2: boom"]


def test_a_server_that_reports_no_cache_gets_no_reuse_numbers():
    outcomes = [_turn("a", 1, 100, 10, 0, reported=False), _turn("a", 2, 150, 10, 0, reported=False)]
    s = metrics.summarize(DriveResult(outcomes, 1.0), metrics.agent_ceilings(outcomes, {"a": 90}, 16), 16, 1000)
    assert s.reusable_tokens == 176 and s.reuse_ratio is None and s.decode_local_hit_rate is None


def test_reuse_counts_what_was_not_computed_anywhere():
    # D held 32 tokens; P computed 20 of the rest and the prompt's other 48 came from P's cache.
    o = _turn("a", 2, 100, 1, 32, 20)
    assert o.reused_tokens == 80
    assert Outcome(kind="turn", id="x", prompt_tokens=100, cached_tokens=48).reused_tokens == 48  # no usage extension


def test_bytes_moved_ratio_by_hand():
    bpb = 1000
    exact = [_turn("a", 2, 100, 1, 32, 68, prefill_node="p", moved=(7 - 2) * bpb)]  # ceil(100/16)=7 blocks, 2 held
    assert metrics.bytes_moved_ratio(exact, 16, bpb) == (1.0, 1)
    all_blocks = [_turn("a", 2, 100, 1, 32, 68, prefill_node="p", moved=7 * bpb)]
    assert metrics.bytes_moved_ratio(all_blocks, 16, bpb) == (pytest.approx(7 / 5), 1)
    assert metrics.bytes_moved_ratio([_turn("a", 2, 100, 1, 32, 68)], 16, bpb) == (None, 0)  # no prefill node


def test_ttft_and_handoff_steps_by_route_by_hand():
    outcomes = [_turn("a", 1, 100, 1, 0, 100, ttft=0.5), _turn("b", 1, 100, 1, 0, 100, ttft=0.7),
                _turn("a", 2, 200, 1, 96, 104, prefill_node="p", ttft=1.2), _turn("b", 2, 200, 1, 96, 104, prefill_node="p", ttft=2.0),
                _turn("c", 1, 100, 1, 0, ttft=0.1)]  # a peer's reply carries no route: not counted  # fmt: skip
    outcomes[2].agentkv.prefill_s = 0.6
    outcomes[3].agentkv.readback, outcomes[3].agentkv.hold_s, outcomes[3].agentkv.prefill_s = True, 0.4, 1.0
    assert metrics.by_route(outcomes) == {
        "disaggregated": {"requests": 1, "ttft_p50_s": 1.2, "hold_p50_s": None, "prefill_p50_s": 0.6},
        "local": {"requests": 2, "ttft_p50_s": pytest.approx(0.6), "hold_p50_s": None, "prefill_p50_s": None},
        "readback": {"requests": 1, "ttft_p50_s": 2.0, "hold_p50_s": 0.4, "prefill_p50_s": 1.0},
    }


def test_reuse_by_turn():
    outcomes = [_turn("a", 1, 100, 1, 80, 20), _turn("b", 1, 100, 1, 0, 100), _turn("a", 2, 200, 1, 96, 104)]
    ceilings = {("a", 1): 80, ("b", 1): 80, ("a", 2): 96}
    assert metrics.reuse_by_turn(outcomes, ceilings) == {1: 0.5, 2: 1.0}


def test_goodput_counts_requests_meeting_both_objectives_by_hand():
    slo = metrics.Slo(ttft_s=1.0, itl_p99_s=0.25)
    outcomes = [
        Outcome(kind="warmup", id="w", ttft_s=9.0, e2e_s=9.0),  # not offered load
        _turn("a", 1, 10, 3, 0, sent_s=0.0, ttft=0.5, itl_s=[0.1, 0.2], e2e_s=0.8),  # both met
        _turn("a", 2, 10, 3, 0, sent_s=2.0, ttft=1.5, itl_s=[0.1, 0.1], e2e_s=1.7),  # TTFT missed
        _turn("b", 1, 10, 3, 0, sent_s=0.0, ttft=0.2, itl_s=[0.1, 0.9], e2e_s=1.2),  # ITL p99 missed
        _turn("b", 2, 10, 1, 0, sent_s=3.0, ttft=0.4, itl_s=[], e2e_s=0.4),  # one token: no gaps, both met
        Outcome(kind="turn", id="c", turn=1, error="boom"),  # meets neither
    ]
    assert metrics.meets(outcomes[2], slo) == (False, True) and metrics.meets(outcomes[3], slo) == (True, False)
    assert metrics.slo_attainment(outcomes[1:], slo) == {"ttft": 0.6, "itl": 0.6, "both": 0.4}
    assert metrics.slo_attainment([], slo) == {"ttft": None, "itl": None, "both": None}
    s = metrics.summarize(DriveResult(outcomes, duration_s=4.0), {}, 16, 1000, slo)
    assert s.goodput_rps == 2 / 4.0 and s.slo_attainment["both"] == 0.4
    # Agent steps: a from 0.0 to 2.0 + 1.7, b from 0.0 to 3.0 + 0.4; c failed and has no step.
    assert sorted(metrics.agent_steps(outcomes)) == [pytest.approx(3.4), pytest.approx(3.7)]
    assert s.agent_step_p50_s == pytest.approx(3.55)


def test_percentile_of_nothing_is_none():
    assert metrics.percentile([], 50) is None


# -------------------------------------------------------------------------------------- report


def _mode(**kw):
    base = {"workload": "agent", "ttft_p50_s": 1.0, "ttft_p99_s": 2.0, "itl_p50_s": 0.1, "itl_p99_s": 0.2,
            "out_tok_s": 10.0, "failed": 0, "reuse_ratio": 0.99, "decode_local_hit_rate": 0.9, "bytes_moved_ratio": 1.0}  # fmt: skip
    return {**base, **kw}


def test_targets_and_table():
    modes = {
        "prefix_aware": _mode(ttft_p50_s=1.0, out_tok_s=30.0),
        "transformers_serve": _mode(ttft_p50_s=4.0, out_tok_s=10.0, reuse_ratio=0.0, bytes_moved_ratio=None),
        "colocated": _mode(workload="hol_mix", ttft_p99_s=9.0),
        "disaggregated": _mode(workload="hol_mix", ttft_p99_s=4.0, failed=1, bytes_moved_ratio=1.2),
    }
    t = report.targets(modes)
    assert t["prefix_aware_ttft_p50_vs_transformers_serve"] == {"value": 0.25, "target": "<= 0.333", "met": True}
    assert t["prefix_aware_out_tok_s_vs_transformers_serve"]["met"] is True
    assert t["prefix_aware_reuse_ratio"]["met"] is True
    assert t["disaggregated_short_ttft_p99_vs_colocated"]["met"] is False
    assert t["disaggregated_goodput_per_core_vs_colocated"]["met"] is None  # no goodput in these modes
    assert t["bytes_moved_ratio"]["met"] is False and t["failed"]["met"] is False
    table = report.markdown({"modes": {**modes, "sticky": {"error": "gateway exited\nlog"}}, "targets": t})
    assert "| prefix_aware | agent | 1.000 | 2.000 |" in table
    assert "| sticky | error: gateway exited |" in table
    assert "| disaggregated_short_ttft_p99_vs_colocated | 0.444 | <= 0.333 | NO |" in table


def test_vllm_pd_targets_against_vllm_alone():
    modes = {"vllm": _mode(ttft_p99_s=8.0, itl_p99_s=2.0, out_tok_s=10.0),
             "vllm_pd": _mode(ttft_p99_s=4.0, itl_p99_s=1.5, out_tok_s=12.0, reuse_ratio=0.97)}  # fmt: skip
    t = report.targets(modes)
    assert t["vllm_pd_ttft_p99_vs_vllm"] == {"value": 0.5, "target": "<= 0.5", "met": True}
    assert t["vllm_pd_itl_p99_vs_vllm"] == {"value": 0.75, "target": "<= 0.5", "met": False}
    assert t["vllm_pd_out_tok_s_vs_vllm"] == {"value": pytest.approx(1.2), "target": ">= 1.2", "met": True}
    assert t["vllm_pd_reuse_ratio"]["met"] is False
    assert "| vllm_pd_itl_p99_vs_vllm | 0.750 | <= 0.5 | NO |" in report.markdown({"modes": modes, "targets": t})
    assert t["vllm_pair_out_tok_s_vs_vllm"] == {"value": None, "target": ">= 1.2", "met": None}  # not run
    pair = report.targets({**modes, "vllm_pair": _mode(ttft_p99_s=2.0, itl_p99_s=1.0, out_tok_s=15.0, reuse_ratio=1.0)})
    assert [pair[f"vllm_pair_{k}"]["value"] for k in ("ttft_p99_vs_vllm", "itl_p99_vs_vllm", "out_tok_s_vs_vllm")] == [0.25, 0.5, 1.5]


def test_goodput_target_is_disaggregated_against_colocated_per_core():
    modes = {"colocated": _mode(workload="hol_mix", goodput_rps_per_core=0.2, agent_step_p99_s=3.0),
             "disaggregated": _mode(workload="hol_mix", goodput_rps_per_core=0.4, agent_step_p99_s=2.0)}  # fmt: skip
    t = report.targets(modes)
    assert t["disaggregated_goodput_per_core_vs_colocated"] == {"value": 2.0, "target": ">= 1.5", "met": True}
    assert "| 0.400 | 2.00 |" in report.markdown({"modes": modes, "targets": t})


def test_targets_of_modes_that_did_not_run_are_unknown():
    assert report.targets({})["prefix_aware_reuse_ratio"]["met"] is None


def test_plots_are_written(tmp_path):
    files = report.plots({"a": [0.1, 0.5, 2.0], "b": []}, {"a": {1: 1.0, 2: 0.5}}, tmp_path)
    for path in files.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_outcomes_round_trip_as_json():
    result = DriveResult([_turn("a", 1, 10, 1, 0, 10, route=RouteStats(decode_node="d"))], 1.0)
    assert msgspec.json.decode(msgspec.json.encode(result), type=DriveResult) == result


# ------------------------------------------------------------------------------- real stack


@pytest.mark.heavy
def test_a_tiny_run_against_a_real_disaggregated_stack(tmp_path):
    """Prefill and decode workers, Valkey and the gateway as real processes on the real model."""
    from bench.agent.run import run

    hol = AgentWorkload(sessions=2, turns=2, system_words=120, tools=2, task_words=8, tool_output_words=8, user_words=4,
                        max_tokens=4, long_docs=1, long_doc_words=300, long_doc_max_tokens=2, long_doc_start_s=0.5)  # fmt: skip
    slo = metrics.Slo(ttft_s=30.0, itl_p99_s=30.0)  # generous: this test checks the wiring, not the machine's speed
    result = run(quick=True, out_dir=tmp_path, modes=["disaggregated"], hol=hol, slo=slo, sweep_rates=(4.0,), log=lambda _: None)
    mode = result["modes"]["disaggregated"]
    assert "error" not in mode, mode.get("error")
    assert mode["workload"] == "hol_mix" and mode["routing"] == "prefix" and mode["topology"] == "disaggregated"
    assert mode["failed"] == 0 and mode["requests"] == 5 and mode["long_docs"]["requests"] == 1
    assert mode["ttft_p50_s"] > 0 and mode["out_tok_s"] > 0
    assert mode["reuse_ratio"] >= 0.9  # every turn after the warm-up finds the system prompt on the decode node
    assert mode["transfer_requests"] >= 1 and mode["bytes_moved_ratio"] == pytest.approx(1.0)  # the document's blocks
    assert mode["slo_attainment"] == {"ttft": 1.0, "itl": 1.0, "both": 1.0} and result["slo"]["ttft_s"] == 30.0
    assert mode["goodput_rps"] == pytest.approx(5 / mode["duration_s"]) and mode["goodput_rps_per_core"] > 0
    assert 0 < mode["agent_step_p50_s"] <= mode["agent_step_p99_s"]
    point = mode["sweep"]["points"][0]
    assert point["rate_per_s"] == 4.0 and point["failed"] == 0 and mode["sweep"]["max_rate_per_s"] == 4.0
    assert set(result["targets"]) >= {"failed", "bytes_moved_ratio"}
    assert json.loads((tmp_path / "agent.json").read_text())["modes"]["disaggregated"]["failed"] == 0
    assert (tmp_path / "agent.md").read_text().startswith("| mode |")
    assert (tmp_path / "ttft_cdf.png").exists() and (tmp_path / "outcomes" / "disaggregated.json").exists()


# -------------------------------------------------------------------------------- vLLM modes
# A stand-in for vLLM's OpenAI server: the bench starts it as `<python> -m vllm.entrypoints...`, it
# records its argv and cores, and streams chat completions with vLLM's usage (cached_tokens).
FAKE_VLLM = r"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
args = sys.argv[sys.argv.index("-m") + 2:]
open(os.environ["FAKE_VLLM_RECORD"], "w").write(json.dumps({"args": args, "cpus": sorted(os.sched_getaffinity(0))}))
class H(BaseHTTPRequestHandler):
    def _send(self, code, body, kind="application/json"):
        self.send_response(code); self.send_header("content-type", kind); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "fake"}]}).encode() if self.path == "/v1/models" else b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        chunks = [{"choices": [{"index": 0, "delta": {"content": " w"}, "finish_reason": None}]}] * body["max_tokens"]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": body["max_tokens"],
                                                "prompt_tokens_details": {"cached_tokens": prompt // 64 * 32}}})
        self._send(200, b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n",
                   "text/event-stream")
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), H).serve_forever()
"""


def test_vllm_modes_wiring(tmp_path, monkeypatch):
    """`vllm` starts one vLLM server on both cores (fp32, prefix caching, blocks of 32) and is measured
    in blocks of 32; `vllm_pd` is a prefill and a decode `--engine vllm` worker, one core each, and
    `vllm_pair` two of them in role both."""
    import sys

    from agentkv.cli import BenchMode
    from agentkv.stack import first_cores
    from bench.agent.modes import MODES, topologies
    from bench.agent.run import run

    assert {"vllm", "vllm_pd", "vllm_pair"} <= {m.value for m in BenchMode}
    modes = {m.name: m for m in MODES}
    assert (modes["vllm_pd"].system, modes["vllm_pd"].routing, modes["vllm_pd"].block_size) == ("agentkv", "prefix", 32)
    pd = topologies("/opt/vllm/bin/python")["vllm_pd"]
    assert [w.role for w in pd] == ["prefill", "decode"] and all(len(w.cpus) == 1 for w in pd)
    assert all(w.args == ("--engine", "vllm", "--vllm-python", "/opt/vllm/bin/python") for w in pd)
    pair = topologies("/opt/vllm/bin/python")["vllm_pair"]
    assert [w.role for w in pair] == ["both", "both"] and [w.args for w in pair] == [w.args for w in pd]
    assert [w.cpus for w in pair] == [w.cpus for w in pd] and modes["vllm_pair"].routing == "prefix"

    (tmp_path / "server.py").write_text(FAKE_VLLM)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "server.py"} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("AGENTKV_VLLM_PYTHON", str(python))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "record.json"))
    agent = AgentWorkload(sessions=2, turns=2, system_words=80, tools=1, task_words=4, tool_output_words=8, user_words=2, max_tokens=3)
    result = run(out_dir=tmp_path / "out", modes=["vllm"], agent=agent, log=lambda _: None)
    mode = result["modes"]["vllm"]
    assert "error" not in mode, mode.get("error")
    assert (mode["system"], mode["block_size"], mode["failed"], mode["requests"]) == ("vllm", 32, 0, 4)
    assert mode["reusable_tokens"] % 32 == 0 and mode["reuse_ratio"] is not None
    record = json.loads((tmp_path / "record.json").read_text())
    args = " ".join(record["args"])
    assert "--dtype float32" in args and "--block-size 32" in args and "--enable-prefix-caching" in args
    assert "--enable-prompt-tokens-details" in args and record["cpus"] == first_cores(2)


def test_up_with_the_vllm_engine_starts_vllm_workers(monkeypatch):
    """`agentkv up --engine vllm`: the same stack, its two workers as `--engine vllm`, blocks of 32, a long start."""
    from typer.testing import CliRunner

    import agentkv.stack
    from agentkv.cli import app

    stacks = []
    monkeypatch.setattr(agentkv.stack, "run_up", lambda stack: stacks.append(stack) or 0)
    assert CliRunner().invoke(app, ["up", "--engine", "vllm", "--vllm-python", "/opt/vllm/bin/python"]).exit_code == 0
    assert CliRunner().invoke(app, ["up"]).exit_code == 0
    vllm, builtin = stacks
    assert [w.role for w in vllm.workers] == ["prefill", "decode"] and vllm.block_size == 32 and vllm.start_timeout_s >= 600
    assert all(w.args == ("--engine", "vllm", "--vllm-python", "/opt/vllm/bin/python") for w in vllm.workers)
    assert all(w.args == () for w in builtin.workers) and builtin.block_size == 16
