"""Where a built-in engine step spends its time: `python -m bench.profile_engine [--batch 8 --context 1024]`.

Runs decode steps (and mixed steps: the same decodes plus a prompt chunk) under torch.profiler on
one thread and prints the top operators by self CPU time, plus the share of the step that is
Python and scheduling around the forward. docs/engine.md keeps the summary of a run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine import _prompts
from kvstore.wire import SamplingParams
from workers.engine import Engine, EngineConfig
from workers.loader import load_model


def steps_of(engine: Engine, batch: int, context: int, prompt: list[int] | None, n: int, prof=None) -> tuple[float, float]:
    """Run `n` steps once `batch` sequences decode (a prompt joining first if given), profiled by
    `prof` if given: (step s, forward s) medians."""
    vocab = engine.paged_model.lm_head.out_features
    for i, p in enumerate(_prompts(batch, context, vocab, seed=7)):
        engine.add_request(f"p{i}-{time.monotonic_ns()}", p, SamplingParams(max_tokens=4 * n, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()
    if prompt is not None:
        engine.add_request(f"long-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    forward_s, step_s = [], []
    run = engine.runner.run

    def timed(batch_):
        start = time.perf_counter()
        out = run(batch_)
        forward_s.append(time.perf_counter() - start)
        return out

    engine.runner.run = timed
    if prof is not None:
        prof.start()
    for _ in range(n):
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
    if prof is not None:
        prof.stop()
    engine.runner.run = run
    for rid in list(engine._seqs):
        engine.abort(rid)
    step_s.sort(), forward_s.sort()
    return step_s[len(step_s) // 2], forward_s[len(forward_s) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    engine = Engine(load_model("smollm2"), EngineConfig())
    vocab = engine.paged_model.lm_head.out_features
    steps_of(engine, 2, 32, None, 2)  # warm-up
    long = _prompts(1, 2048, vocab, seed=9)[0]
    for label, prompt in (("decode", None), ("mixed (the same decodes + chunks of a 2048-token prompt)", long)):
        prof = profile(activities=[ProfilerActivity.CPU])
        step, forward = steps_of(engine, args.batch, args.context, prompt, args.steps, prof)
        print(f"\n== {label}: batch {args.batch}, context {args.context}: step {step * 1000:.1f} ms median, "
              f"forward {forward * 1000:.1f} ms ({forward / step:.0%} of the step)")  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
