"""`agentkv bench engine`: the engine against plain transformers, measured in one run.

decode_tok_s: continuous-batching decode throughput at batch 1, 8, 32 (decode steps only).
constrained_decode_tok_s: the same under a JSON-schema grammar (an object holding a list of at least
100 numbers, so no sequence finishes early and the batch stays full); constrained_vs_free: the ratio.
static_tok_s_32: transformers' own batched forward with its own KV cache, 32 sequences, same
threads, same prompt and output lengths (the baseline the engine must stay close to).
prefill_tok_s / ttft_cold_s: a 2048-token prompt from an empty cache; ttft_warm_s: the same prompt
plus 64 new tokens, the rest served by the prefix cache. model_load_s: first load (GGUF
dequantization into an empty cache dir) and cached load.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import tempfile
import time

import torch

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
    """Decode tokens per second of `batch` sequences advancing together (prefill excluded)."""
    vocab = engine.paged_model.lm_head.out_features
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, grammar=grammar)
    for i, prompt in enumerate(_prompts(batch, prompt_len, vocab, seed=batch)):
        engine.add_request(f"dec{batch}-{i}-{time.monotonic_ns()}", prompt, params)
    decode_time, decode_tokens = 0.0, 0
    while engine.has_work():
        is_decode = not engine.scheduler.waiting and all(s.num_uncomputed == 1 for s in engine.scheduler.running)
        start = time.perf_counter()
        chunks = engine.step()
        if is_decode:
            decode_time += time.perf_counter() - start
            decode_tokens += sum(len(c.token_ids) for c in chunks)
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


def run(
    model: str = "smollm2",
    prompt_len: int = 64,
    new_tokens: int = 32,
    long_prompt: int = 2048,
    repeats: int = 3,
    measure_load: bool = True,
) -> dict:
    loaded = load_model(model)
    engine = Engine(loaded, EngineConfig(max_num_batched_tokens=max(4096, long_prompt + 64)))
    result: dict = {"model": model, "device": str(loaded.device), "threads": torch.get_num_threads()}
    engine_decode_tok_s(engine, 4, 16, 4)  # warm-up
    engine_decode_tok_s(engine, 4, 16, 4, BENCH_GRAMMAR)  # warm-up (llguidance's tokenizer, the grammar)
    free: dict[str, list[float]] = {}
    constrained: dict[str, list[float]] = {}
    for b in (1, 8, 32):
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits both alike; the ratio is per pair
            free.setdefault(str(b), []).append(engine_decode_tok_s(engine, b, prompt_len, new_tokens))
            constrained.setdefault(str(b), []).append(engine_decode_tok_s(engine, b, prompt_len, new_tokens, BENCH_GRAMMAR))
    result["decode_tok_s"] = {b: round(statistics.median(v), 2) for b, v in free.items()}
    result["constrained_decode_tok_s"] = {b: round(statistics.median(v), 2) for b, v in constrained.items()}
    result["constrained_vs_free"] = {
        b: round(statistics.median(c / f for c, f in zip(constrained[b], free[b])), 3) for b in free
    }
    result["static_tok_s_32"] = round(
        statistics.median(static_tok_s(loaded, 32, prompt_len, new_tokens) for _ in range(repeats)), 2
    )
    result["decode_vs_static_32"] = round(result["decode_tok_s"]["32"] / result["static_tok_s_32"], 3)
    vocab = engine.paged_model.lm_head.out_features
    colds, warms = [], []
    for i in range(repeats):
        engine.pool.reset_cache()
        prompt = _prompts(1, long_prompt, vocab, seed=1000 + i)[0]
        colds.append(ttft(engine, prompt))
        warms.append(ttft(engine, prompt + _prompts(1, 64, vocab, seed=2000 + i)[0]))
    result["ttft_cold_s"] = round(statistics.median(colds), 3)
    result["ttft_warm_s"] = round(statistics.median(warms), 3)
    result["prefill_tok_s"] = round(long_prompt / result["ttft_cold_s"], 1)
    result["warm_vs_cold"] = round(result["ttft_warm_s"] / result["ttft_cold_s"], 3)
    result["settings"] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "long_prompt": long_prompt, "repeats": repeats}
    if measure_load:
        result["model_load_s"] = model_load_s(model)
    return result
