"""The engine on the real SmolLM2 model, checked against Hugging Face `generate`."""

import math
import time
from types import SimpleNamespace

import pytest
import torch

from kvstore.wire import SamplingParams
from model_fixtures import smollm2  # noqa: F401  (fixture)
from workers.backend import InvalidRequest
from workers.detokenizer import Detokenizer
from workers.engine import AdoptedKV, Engine, EngineConfig

pytestmark = pytest.mark.heavy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one paragraph what a KV cache is.",
    "Hello! Tell me about yourself.",
]
# Logprobs of a cached and a fresh prefill differ by float reordering, not by meaning.
LOGPROB_TOL = 1e-3


def chat_ids(tokenizer, text: str) -> list[int]:
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, EngineConfig(num_blocks=400))


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [chat_ids(smollm2.tokenizer, p) for p in PROMPTS]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: HF generate, greedy, EOS suppressed so every prompt yields `n` tokens."""
    eos = model.hf_model.generation_config.eos_token_id
    out = model.hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, suppress_tokens=[eos], pad_token_id=eos
    )
    return out[0, len(prompt) :].tolist()


def generate(engine, prompts, sampling):
    """Run prompts to completion on the engine alone (no thread, no server); one result per prompt."""
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        rid = f"gen-{time.monotonic_ns()}-{i}"
        results[rid] = SimpleNamespace(token_ids=[], text="", logprobs=[], finish_reason=None, cached_tokens=0)
        engine.add_request(rid, prompt, p)
    while engine.has_work():
        for chunk in engine.step():
            res = results[chunk.request_id]
            res.token_ids += chunk.token_ids
            res.text += chunk.text
            res.logprobs += chunk.logprobs or []
            res.cached_tokens = chunk.cached_tokens
            if chunk.finished:
                res.finish_reason = chunk.finish_reason
    return list(results.values())


def solo(engine, prompt, params):
    return generate(engine, [prompt], params)[0]


def greedy(n=32, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, logprobs=True, **kw)


def test_greedy_tokens_equal_hf_generate(smollm2, engine, prompts):
    eos = smollm2.hf_model.generation_config.eos_token_id
    # Suppress EOS in the engine the same way: a stop on EOS would end before 32 tokens.
    results = generate(engine, prompts, greedy())
    for prompt, result in zip(prompts, results):
        ref = hf_greedy(smollm2, prompt, 32)
        ours = result.token_ids
        if eos in ours:  # HF suppressed EOS; compare up to where ours produced it
            cut = ours.index(eos)
            assert ours[:cut] == ref[:cut]
        else:
            assert ours == ref
        assert len(ours) == 32


class OpenAIPenalties:
    """HF logits processor with OpenAI's definition: logit - presence * [in reply] - frequency * count + bias."""

    def __init__(self, prompt_len: int, presence: float, frequency: float, bias: dict[int, float]) -> None:
        self.prompt_len, self.presence, self.frequency, self.bias = prompt_len, presence, frequency, bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row in range(scores.shape[0]):
            reply = input_ids[row, self.prompt_len :]
            counts = torch.bincount(reply, minlength=scores.shape[-1]).to(scores.dtype)
            scores[row] -= self.presence * (counts > 0).to(scores.dtype) + self.frequency * counts
            for token, b in self.bias.items():
                scores[row, token] += b
        return scores


def test_penalties_and_logit_bias_equal_hf_generate_with_openais_definition(smollm2, engine, prompts):
    """Greedy under presence/frequency penalties and a bias: the same tokens as HF generate with those
    adjustments as a logits processor, and different from plain greedy (the penalties bite)."""
    eos = smollm2.hf_model.generation_config.eos_token_id
    plain = generate(engine, prompts[:2], greedy(24, logit_bias={eos: -100.0}))  # EOS banned as HF's suppress_tokens does
    banned = plain[0].token_ids[3]  # a token plain greedy writes early: banned, it must not appear
    bias = {eos: -100.0, banned: -100.0}
    for presence, frequency in ((0.8, 0.0), (0.0, 0.6)):
        results = generate(engine, prompts[:2], greedy(24, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias))
        for prompt, result, before in zip(prompts[:2], results, plain):
            processor = OpenAIPenalties(len(prompt), presence, frequency, bias)
            out = smollm2.hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, suppress_tokens=[eos],
                                            pad_token_id=eos, logits_processor=[processor])  # fmt: skip
            assert result.token_ids == out[0, len(prompt) :].tolist()
            assert banned not in result.token_ids and result.token_ids != before.token_ids


def test_prefix_cache_hit_gives_same_tokens_and_logprobs(engine, prompts):
    engine.pool.reset_cache()
    cold = solo(engine, prompts[1], greedy())
    warm = solo(engine, prompts[1], greedy())
    assert cold.cached_tokens == 0
    assert warm.cached_tokens >= (len(prompts[1]) - 1) // 16 * 16 - 16
    assert warm.token_ids == cold.token_ids
    assert max(abs(a - b) for a, b in zip(warm.logprobs, cold.logprobs)) < LOGPROB_TOL


def test_next_turn_hits_generated_tokens_too(engine, prompts, smollm2):
    first = solo(engine, prompts[2], greedy(40))
    follow_up = prompts[2] + first.token_ids + chat_ids(smollm2.tokenizer, "And two more?")[1:]
    second = solo(engine, follow_up, greedy(8))
    # everything up to the last full block of turn 1 (prompt + completion) is cached
    assert second.cached_tokens >= (len(prompts[2]) + 40) // 16 * 16 - 16


def test_eight_concurrent_sequences_equal_their_solo_runs(engine, prompts):
    mixed = [prompts[i % 5][: 10 + 7 * i] if i >= 5 else prompts[i] for i in range(8)]
    lengths = [8 + 3 * i for i in range(8)]
    params = [greedy(n) for n in lengths]
    batched = generate(engine, mixed, params)
    engine.pool.reset_cache()
    for prompt, p, result in zip(mixed, params, batched):
        alone = solo(engine, prompt, p)
        assert result.token_ids == alone.token_ids
        assert len(result.token_ids) == p.max_tokens


def test_chunked_prefill_equals_one_shot(smollm2, prompts):
    small = Engine(smollm2, EngineConfig(num_blocks=200, max_num_batched_tokens=7))
    big = Engine(smollm2, EngineConfig(num_blocks=200))
    assert solo(small, prompts[3], greedy(12)).token_ids == solo(big, prompts[3], greedy(12)).token_ids


def test_a_prompt_arriving_mid_decode_shares_steps_with_the_decodes(smollm2, prompts):
    """Mixed steps: while a long prompt is prefilled in chunks, every running decode advances in the
    same steps (none waits for the prompt), and every output equals its solo run."""
    engine = Engine(smollm2, EngineConfig(num_blocks=400, mixed_prefill_tokens=16, short_prompt_tokens=32))
    steps = []
    run = engine.runner.run
    engine.runner.run = lambda batch: steps.append(list(batch.query_lens)) or run(batch)
    long_prompt = prompts[3] * 3  # ~3 x 40 tokens: several 16-token chunks
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(f"early-{i}", prompt, greedy(40))
    results = {f"early-{i}": [] for i in range(3)} | {"late": []}
    started = False
    while engine.has_work():
        for chunk in engine.step():
            results[chunk.request_id] += chunk.token_ids
        if not started and all(len(results[f"early-{i}"]) >= 2 for i in range(3)):
            engine.add_request("late", long_prompt, greedy(8))
            started = True
    mixed = [q for q in steps if q.count(1) == 3 and any(n > 1 for n in q)]
    assert len(mixed) >= 3  # the prompt's chunks rode along with all three decodes
    assert all(max(q) <= 16 for q in mixed)  # the cap bounds what a prompt adds to a decode step
    for i, prompt in enumerate(prompts[:3]):
        assert results[f"early-{i}"] == solo(engine, prompt, greedy(40)).token_ids
    assert results["late"] == solo(engine, long_prompt, greedy(8)).token_ids


def test_preemption_when_blocks_run_out_keeps_outputs_correct(smollm2, prompts):
    # 5 sequences x (~40 prompt + 48 generated) tokens need ~30 blocks; give the pool 16.
    tight = Engine(smollm2, EngineConfig(num_blocks=16))
    roomy = Engine(smollm2, EngineConfig(num_blocks=200))
    outs = generate(tight, prompts, greedy(48))
    assert tight.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == solo(roomy, prompt, greedy(48)).token_ids
    assert tight.pool.num_free == tight.pool.num_blocks


def test_stop_strings_and_stop_tokens(engine, prompts):
    full = solo(engine, prompts[0], greedy(24))
    stop_at = full.text.split()[2]
    stopped = solo(engine, prompts[0], greedy(24, stop=[stop_at]))
    assert stopped.finish_reason == "stop"
    assert stop_at not in stopped.text and full.text.startswith(stopped.text)
    by_token = solo(engine, prompts[0], greedy(24, stop_token_ids=[full.token_ids[3]]))
    assert by_token.token_ids == full.token_ids[:4] and by_token.finish_reason == "stop"


def test_eos_stops_and_max_tokens_caps(engine, prompts):
    natural = solo(engine, prompts[0], SamplingParams(max_tokens=64))
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in engine.eos_token_ids
    capped = solo(engine, prompts[0], SamplingParams(max_tokens=3))
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3


def test_seeded_sampling_is_reproducible(engine, prompts):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = solo(engine, prompts[1], p)
    b = solo(engine, prompts[1], p)
    c = solo(engine, prompts[1], SamplingParams(max_tokens=16, temperature=0.9, seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_abort_frees_every_block(engine, prompts):
    engine.pool.reset_cache()
    free_before = engine.pool.num_free
    engine.add_request("to-abort", prompts[3], greedy(100))
    engine.step()
    engine.step()
    assert engine.pool.num_free < free_before
    final = engine.abort("to-abort")
    assert final.finished and final.finish_reason == "abort"
    assert engine.pool.num_free == free_before
    assert not engine.has_work()


@pytest.mark.parametrize(
    ("prompt", "params", "code"),
    [
        ([], SamplingParams(), "invalid_request"),
        ([1, 2, 3], SamplingParams(max_tokens=0), "invalid_request"),
        ([1] * 9000, SamplingParams(), "context_length_exceeded"),
        ([1, 10**9], SamplingParams(), "invalid_request"),
    ],
)
def test_bad_requests_are_clear_errors(engine, prompt, params, code):
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("bad", prompt, params)
    assert err.value.code == code and str(err.value)


def test_block_size_must_divide_context(smollm2):
    with pytest.raises(InvalidRequest, match="must divide the context length"):
        Engine(smollm2, EngineConfig(block_size=24, num_blocks=8))


def test_adopted_blocks_continue_decoding_like_a_local_prefill(smollm2, engine, prompts):
    """Disaggregation hook: KV computed elsewhere, copied into reserved blocks, decodes identically."""
    prompt = prompts[4]
    local = solo(engine, prompt, greedy(16))
    prefill_node = Engine(smollm2, EngineConfig(num_blocks=64))
    prefill_node.add_request("p", prompt, greedy(1), hold_blocks=True)
    [first] = [c for c in prefill_node.step() if c.finished]
    source = prefill_node.held["p"]
    assert len(source) == -(-len(prompt) // 16)  # full blocks and the partial last one
    engine.pool.reset_cache()
    free_before = engine.pool.num_free
    dest = engine.pool.allocate(len(source))
    engine.pool.kv[dest] = prefill_node.pool.kv[source]  # what a transfer does
    prefill_node.pool.release(prefill_node.held.pop("p"))
    assert prefill_node.pool.num_free == prefill_node.pool.num_blocks
    engine.add_request(
        "adopted", prompt, greedy(16),
        adopted=AdoptedKV(dest, num_computed=len(prompt), first_token=first.token_ids[0], first_logprob=first.logprobs[0]),
    )
    out, final = [], None
    while engine.has_work():
        for chunk in engine.step():
            out += chunk.token_ids
            final = chunk if chunk.finished else final
    assert out == local.token_ids
    assert final.transferred_blocks == len(source) and final.transferred_tokens == len(prompt)
    assert final.transferred_bytes == len(source) * engine.pool.bytes_per_block
    assert engine.pool.num_free == free_before


def test_detokenizer_streams_multibyte_characters_whole_and_skips_special_tokens(smollm2):
    tok = smollm2.tokenizer
    text = "Ünïcödé 日本語 🤖🎉 café<|im_end|> done"
    ids = tok.encode(text, add_special_tokens=False)
    detok = Detokenizer(tok, [])
    pieces = [detok.push(i)[0] for i in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert "\ufffd" not in "".join(pieces)


def test_detokenizer_holds_back_a_possible_stop_string_until_it_is_decided(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("The answer is 42. Done here.", add_special_tokens=False)
    detok = Detokenizer(tok, ["Done", "is 4x"])
    out, hit = "", False
    for i in ids:
        piece, hit = detok.push(i)
        out += piece
        if hit:
            break
    assert hit and out == "The answer is 42. "
    nonstop = Detokenizer(tok, ["is 4x"])
    assert "".join(nonstop.push(i)[0] for i in ids) + nonstop.flush() == "The answer is 42. Done here."


def test_a_top_p_below_float32_range_keeps_the_most_likely_token():
    """top_p=1e-300 is valid ((0, 1]) but rounds to 0.0 against float32 probabilities: it must still keep one token."""
    from workers.sampler import sample
    from workers.sequence import Sequence

    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    seq = Sequence(request_id="tiny-top-p", token_ids=[1], sampling=SamplingParams(temperature=1.0, top_p=1e-300, seed=0))
    tokens, logprobs = sample(logits, [seq])
    assert tokens == [1] and math.isfinite(logprobs[0])


def test_a_temperature_below_float32_range_samples_the_most_likely_token():
    """temperature=5e-324 (the fuzzer's find) overflowed logits / temperature to inf and failed the step:
    it is the greedy limit."""
    from workers.sampler import sample
    from workers.sequence import Sequence

    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [2.0, -1.0, 0.5, 1.0]])
    seqs = [Sequence(request_id=f"tiny-temperature-{i}", token_ids=[1], sampling=SamplingParams(temperature=5e-324, top_p=top_p, seed=0))
            for i, top_p in enumerate((1.0, 5e-324))]  # fmt: skip
    tokens, logprobs = sample(logits, seqs)
    assert tokens == [1, 0] and all(math.isfinite(lp) for lp in logprobs)



def test_step_costs_size_the_prompt_share_of_a_mixed_step():
    """The rule, on made-up timings: a CPU-like node gets a small chunk, a GPU-like one the cap."""
    from workers.scheduler import StepCosts

    cpu = StepCosts()
    assert cpu.prompt_tokens_within(1.5, 16, 512) == 16  # nothing measured yet: the floor
    cpu.observe(0, 1024, 1024 * 0.0015)  # a prompt alone: 1.5 ms a token
    cpu.observe(8, 16, 0.080 + 16 * 0.0015)  # decodes with a prompt chunk: the decode part is 80 ms
    assert cpu.prompt_tokens_within(1.5, 16, 512) == 26  # 0.5 x 80 ms / 1.5 ms
    cpu.observe(8, 0, 0.080)  # a decode-only step agrees
    assert cpu.prompt_tokens_within(1.5, 16, 512) == 26
    gpu = StepCosts()
    gpu.observe(0, 2048, 0.015)
    gpu.observe(8, 0, 0.010)
    assert gpu.prompt_tokens_within(1.5, 16, 512) == 512


def _decoding_and_recording(engine: Engine, prompt: list[int]) -> list[dict[str, int]]:
    """Start a 30-token decode and record every later step as {request id: tokens it computed}."""
    steps = []
    run = engine.runner.run
    engine.runner.run = lambda batch: steps.append({s.request_id: n for s, n in zip(batch.seqs, batch.query_lens)}) or run(batch)
    engine.add_request("decoding", prompt, greedy(30))
    while not any(s.get("decoding") == 1 for s in steps):
        engine.step()
    return steps


def test_a_short_new_turn_is_prefilled_whole_beside_decodes_and_a_long_prompt_in_chunks(smollm2, prompts):
    """An agent's next turn (a few hundred uncached tokens) gets its prompt in one step even while
    decodes run; a long prompt is chunked by the ITL rule."""
    engine = Engine(smollm2, EngineConfig(num_blocks=400, mixed_prefill_tokens=16, short_prompt_tokens=64))
    steps = _decoding_and_recording(engine, prompts[0])
    engine.add_request("short", prompts[1], greedy(4))  # ~40 tokens <= 64
    engine.add_request("long", prompts[3] * 3, greedy(4))  # ~120 tokens > 64
    while engine.has_work():
        engine.step()
    short = [s["short"] for s in steps if "short" in s and s["short"] > 1]
    long = [s["long"] for s in steps if "long" in s and s["long"] > 1]
    assert len(short) == 1 and short[0] >= len(prompts[1]) - 16  # one step beside the decode (a template block may be cached)
    assert len(long) >= 3 and max(long) <= 16


def test_with_no_short_prompt_rule_a_short_turn_is_chunked_within_the_itl_budget(smollm2, prompts):
    """`--short-prompt-tokens 0` (steady decodes first): a short new turn is chunked by the ITL rule
    like any prompt, and its output is unchanged."""
    engine = Engine(smollm2, EngineConfig(num_blocks=400, mixed_prefill_tokens=16, short_prompt_tokens=0))
    steps = _decoding_and_recording(engine, prompts[0])
    engine.add_request("short", prompts[1], greedy(4))  # ~40 tokens: whole by default, chunked here
    out = []
    while engine.has_work():
        out += [t for c in engine.step() if c.request_id == "short" for t in c.token_ids]
    short = [s["short"] for s in steps if "short" in s and s["short"] > 1]
    assert len(short) >= 2 and max(short) <= 16
    assert out == solo(engine, prompts[1], greedy(4)).token_ids
