"""`agentkv bench engine`: the built-in engine, vLLM's CPU build and plain transformers, in one run.

Both engines run pinned to the same single core (vLLM's API frontend, which our in-process engine
does not have, gets the other), fp32 both, on the same token ids (`_prompts`):
decode_tok_s: decode throughput of 1, 8, 32 sequences with `context`-token contexts (decode steps only).
prefill_tok_s / ttft_cold_s: a 2048-token prompt from an empty cache; ttft_warm_s: the same prompt
plus 64 new tokens, the rest served by the prefix cache.
itl_*: 8 sequences decoding (256-token contexts), their inter-token gaps alone and while a
2048-token prompt is prefilled on the same engine (mixed steps keep them moving).
constrained_decode_tok_s: decode under a JSON-schema grammar (an object holding a list of at least
100 numbers, so the batch stays full), short contexts; constrained_vs_free: its ratio to free decode.
static_tok_s_32: transformers' own batched forward with its own KV cache, 32 sequences, short contexts.
vllm: the same figures from vLLM (bench/engine_vllm.py); vs_vllm: built-in / vLLM.
model_load_s: first load (GGUF dequantization into an empty cache dir) and cached load.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from agentkv.stack import StackError, vllm_python as default_vllm_python
from bench.engine_vllm import ITL_ALONE_TOKENS, ITL_CONTEXT, ITL_TOKENS, measure_vllm
from kvstore.wire import SamplingParams
from workers.engine import Engine, EngineConfig
from workers.loader import LoadedModel, load_model


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=gen).tolist()


# A JSON-schema grammar that stays open for the whole measurement (>= 100 items to write).
BENCH_SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "number"}, "minItems": 100}},
                "required": ["values"], "additionalProperties": False}  # fmt: skip
BENCH_GRAMMAR = "start: %json " + json.dumps(
    {**BENCH_SCHEMA, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
)


def engine_decode_tok_s(engine: Engine, batch: int, prompt_len: int, new_tokens: int, grammar: str | None = None) -> float:
    """Decode tokens per second of `batch` sequences advancing together: only steps where all of
    them decode count. Prompts get the whole token budget here (the scheduler would otherwise trickle
    them in beside the first decodes to protect their ITL, and the batch would never be whole)."""
    vocab = engine.paged_model.lm_head.out_features
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, grammar=grammar)
    sched = engine.scheduler
    saved = sched.itl_slowdown, sched.mixed_prefill_tokens
    sched.itl_slowdown, sched.mixed_prefill_tokens = float("inf"), sched.max_num_batched_tokens
    try:
        for i, prompt in enumerate(_prompts(batch, prompt_len, vocab, seed=batch)):
            engine.add_request(f"dec{batch}-{i}-{time.monotonic_ns()}", prompt, params)
        decode_time, decode_tokens = 0.0, 0
        while engine.has_work():
            whole = not sched.waiting and len(sched.running) == batch and all(s.num_uncomputed == 1 for s in sched.running)
            start = time.perf_counter()
            chunks = engine.step()
            if whole:
                decode_time += time.perf_counter() - start
                decode_tokens += sum(len(c.token_ids) for c in chunks)
    finally:
        sched.itl_slowdown, sched.mixed_prefill_tokens = saved
    return decode_tokens / decode_time


def static_tok_s(model: LoadedModel, batch: int, prompt_len: int, new_tokens: int) -> float:
    """transformers batched forward with its own DynamicCache: the static-batching baseline."""
    from transformers import DynamicCache

    hf = model.hf_model
    vocab = hf.config.vocab_size
    ids = torch.tensor(_prompts(batch, prompt_len, vocab, seed=batch), device=model.device)
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        out = hf(input_ids=ids, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        elapsed = time.perf_counter() - start
    return batch * (new_tokens - 1) / elapsed


def ttft(engine: Engine, prompt: list[int]) -> float:
    """Seconds from submission to the first generated token."""
    rid = f"ttft-{time.monotonic_ns()}"
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_work():
        if any(c.token_ids for c in engine.step()):
            break
    return time.perf_counter() - start


def model_load_s(spec: str) -> dict[str, float]:
    """First load into an empty cache dir (dequantization), then a cached load."""
    previous = os.environ.get("AGENTKV_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AGENTKV_CACHE"] = tmp
        try:
            first = load_model(spec).load_s
            cached = load_model(spec).load_s
        finally:
            if previous is None:
                os.environ.pop("AGENTKV_CACHE", None)
            else:
                os.environ["AGENTKV_CACHE"] = previous
    return {"first": round(first, 2), "cached": round(cached, 2)}


def itl_under_prefill(engine: Engine, batch: int, context: int, max_tokens: int, alone_tokens: int, long_prompt: list[int],
                      vocab: int) -> dict[str, float]:  # fmt: skip
    """Inter-token gaps of `batch` decoding sequences: `alone_tokens` each with nothing else running,
    then every gap that overlaps the prefill of `long_prompt` (its submission to its first token)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [f"itl-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for rid, prompt in zip(ids, _prompts(batch, context, vocab, seed=40_000)):
        engine.add_request(rid, prompt, params)
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    long_id, submitted, first_long = f"itl-long-{time.monotonic_ns()}", 0.0, 0.0
    while engine.has_work():
        chunks = engine.step()
        now = time.perf_counter()
        for c in chunks:
            if c.token_ids and c.request_id in times:
                times[c.request_id].append(now)
            elif c.token_ids and c.request_id == long_id and not first_long:
                first_long = now
        started = all(times.values()) and max(t[0] for t in times.values())
        if started and not submitted and min(sum(1 for x in t if x > started) for t in times.values()) >= alone_tokens:
            engine.add_request(long_id, long_prompt, SamplingParams(max_tokens=1, ignore_eos=True))
            submitted = time.perf_counter()
    all_started = max(t[0] for t in times.values())
    alone = [b - a for t in times.values() for a, b in zip(t, t[1:]) if all_started <= a and b <= submitted]
    during = [b - a for t in times.values() for a, b in zip(t, t[1:]) if b > submitted and a < first_long]
    p99 = lambda xs: float(np.percentile(xs, 99))  # noqa: E731
    return {"itl_p50_alone_s": round(statistics.median(alone), 4), "itl_p99_alone_s": round(p99(alone), 4),
            "itl_p99_with_prefill_s": round(p99(during), 4), "itl_with_prefill_vs_alone": round(p99(during) / p99(alone), 3),
            "itl_ttft_under_decode_s": round(first_long - submitted, 3)}  # fmt: skip


def run(
    model: str = "smollm2",
    context: int = 1024,
    new_tokens: int = 32,
    long_prompt: int = 2048,
    repeats: int = 3,
    measure_load: bool = True,
    core: int | None = None,
    vllm_python: str | None = None,
    short_prompt: int = 64,
) -> dict:
    """Every figure of the module docstring; `vllm_python=""` skips the vLLM column."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[0] if core is None else core
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        result = _builtin(model, context, new_tokens, long_prompt, repeats, short_prompt)
    finally:
        os.sched_setaffinity(0, cores)
    result["settings"].update(core=core, threads=1)
    python = default_vllm_python() if vllm_python is None else vllm_python
    vocab = result.pop("vocab")
    if python:
        result["vllm"] = _vllm(python, model, vocab, core, context, new_tokens, long_prompt)
        result["vs_vllm"] = _versus(result, result["vllm"])
    if measure_load:
        result["model_load_s"] = model_load_s(model)
    return result


def _builtin(model: str, context: int, new_tokens: int, long_prompt: int, repeats: int, short_prompt: int) -> dict:
    loaded = load_model(model)
    longest = max(32 * (context + new_tokens), 8 * (ITL_CONTEXT + ITL_TOKENS) + long_prompt + 64)
    per_token = loaded.hf_model.config.num_hidden_layers * 2 * loaded.hf_model.config.num_key_value_heads * 64 * 4
    engine = Engine(loaded, EngineConfig(max_num_batched_tokens=max(4096, long_prompt + 64),
                                         kv_cache_bytes=max(1 << 30, int(longest * per_token * 1.2))))  # fmt: skip
    result: dict = {"model": model, "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
                    "mixed_prefill_tokens": engine.config.mixed_prefill_tokens}  # fmt: skip
    vocab = engine.paged_model.lm_head.out_features
    engine_decode_tok_s(engine, 4, 16, 4)  # warm-up
    engine_decode_tok_s(engine, 4, 16, 4, BENCH_GRAMMAR)  # warm-up (llguidance's tokenizer, the grammar)
    # Long contexts: one pass per batch (32 x 1024 tokens of prefill each); the rate is over every decode step.
    result["decode_tok_s"] = {str(b): round(engine_decode_tok_s(engine, b, context, new_tokens), 2) for b in (1, 8, 32)}
    free: dict[str, list[float]] = {}
    constrained: dict[str, list[float]] = {}
    for b in (1, 8, 32):
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits both alike; the ratio is per pair
            free.setdefault(str(b), []).append(engine_decode_tok_s(engine, b, short_prompt, new_tokens))
            constrained.setdefault(str(b), []).append(engine_decode_tok_s(engine, b, short_prompt, new_tokens, BENCH_GRAMMAR))
    result["short_context_decode_tok_s"] = {b: round(statistics.median(v), 2) for b, v in free.items()}
    result["constrained_decode_tok_s"] = {b: round(statistics.median(v), 2) for b, v in constrained.items()}
    result["constrained_vs_free"] = {
        b: round(statistics.median(c / f for c, f in zip(constrained[b], free[b])), 3) for b in free
    }
    result["static_tok_s_32"] = round(
        statistics.median(static_tok_s(loaded, 32, short_prompt, new_tokens) for _ in range(repeats)), 2
    )
    result["decode_vs_static_32"] = round(result["short_context_decode_tok_s"]["32"] / result["static_tok_s_32"], 3)
    colds, warms = [], []
    for i in range(repeats):
        engine.pool.reset_cache()
        prompt = _prompts(1, long_prompt, vocab, seed=30_000 + i)[0]
        colds.append(ttft(engine, prompt))
        warms.append(ttft(engine, prompt + _prompts(1, 64, vocab, seed=2000 + i)[0]))
    result["ttft_cold_s"] = round(statistics.median(colds), 3)
    result["ttft_warm_s"] = round(statistics.median(warms), 3)
    result["prefill_tok_s"] = round(long_prompt / result["ttft_cold_s"], 1)
    result["warm_vs_cold"] = round(result["ttft_warm_s"] / result["ttft_cold_s"], 3)
    engine.pool.reset_cache()
    long = _prompts(1, long_prompt, vocab, seed=50_000)[0]
    result.update(itl_under_prefill(engine, 8, ITL_CONTEXT, ITL_TOKENS, ITL_ALONE_TOKENS, long, vocab))
    result["settings"] = {"context": context, "new_tokens": new_tokens, "long_prompt": long_prompt, "repeats": repeats,
                          "short_prompt": short_prompt, "itl_batch": 8, "itl_context": ITL_CONTEXT}  # fmt: skip
    result["vocab"] = vocab  # the vLLM column draws the same token ids
    return result


def _vllm(python: str, model: str, vocab: int, core: int, context: int, new_tokens: int, long_prompt: int) -> dict:
    """vLLM's figures on the same core and token ids, or why there are none."""
    from workers.loader import resolve_model_path

    try:
        with tempfile.TemporaryDirectory(prefix="agentkv-bench-vllm-") as logs:
            return measure_vllm(python, Path(resolve_model_path(model)[0]), core=core, log_dir=Path(logs), context=context,
                                new_tokens=new_tokens, long_prompt=long_prompt,
                                prompts=lambda n, length, seed: _prompts(n, length, vocab, seed))  # fmt: skip
    except (StackError, OSError, httpx.HTTPError) as exc:
        return {"error": f"vLLM not measured: {exc}"}


def _versus(ours: dict, vllm: dict) -> dict:
    """Built-in / vLLM for each shared figure, with the issue's targets."""
    if "error" in vllm:
        return {}
    # vLLM's full-batch window (every stream started, none finished) is the same measure as ours.
    theirs = vllm.get("decode_full_batch_tok_s") or vllm["decode_tok_s"]
    ratio = {f"decode_{b}": round(ours["decode_tok_s"][b] / theirs[b], 3) for b in ours["decode_tok_s"]}
    ratio["prefill"] = round(ours["prefill_tok_s"] / vllm["prefill_tok_s"], 3)
    targets = {k: {"value": v, "target": ">= 0.8", "met": v >= 0.8} for k, v in ratio.items()}
    itl = ours["itl_with_prefill_vs_alone"]
    targets["itl_with_prefill_vs_alone"] = {"value": itl, "target": "<= 2", "met": itl <= 2}
    return {"ratios": ratio, "vllm_itl_with_prefill_vs_alone": vllm.get("itl_with_prefill_vs_alone"), "targets": targets}
