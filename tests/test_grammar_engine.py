"""Constrained decoding in the built-in engine, on the real SmolLM2 model.

The grammar's mask goes on the logits of its own rows only: constrained and free sequences share a
batch, survive preemption, prefix-cache hits and adopted KV, and every constrained reply parses.
"""

import json
import time

import jsonschema
import pytest
import torch

from kvstore.wire import SamplingParams
from model_fixtures import smollm2  # noqa: F401  (fixture)
from test_engine import chat_ids, engine, generate, greedy, solo  # noqa: F401  (engine: fixture)
from workers.backend import InvalidRequest
from workers.engine import AdoptedKV, Engine, EngineConfig
from workers.grammar import apply_masks, unpack_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
JSON_GRAMMAR = "start: %json " + json.dumps(
    {**SCHEMA, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
)
QUESTIONS = [
    "Give me the weather plan for Paris as JSON.",
    "What should I pack for a week in Oslo? Answer in JSON.",
    "Forecast request for Tokyo, 3 days.",
    "Tell me a joke.",
    "Describe Rome in JSON.",
    "Hello!",
    "List three prime numbers.",
    "I am going to Lima for 10 days.",
]


@pytest.fixture(scope="module")
def questions(smollm2):
    return [chat_ids(smollm2.tokenizer, q) for q in QUESTIONS]


def constrained(n=80, **kw):
    return SamplingParams(max_tokens=n, grammar=JSON_GRAMMAR, logprobs=True, **kw)


def test_bitmask_unpacks_bit_j_of_word_i_to_token_32i_plus_j():
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << 3
    bitmask[1, 1] = 1 << 0
    allowed = unpack_bitmask(bitmask, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().flatten().tolist() == [3]
    assert allowed[1].nonzero().flatten().tolist() == [32]


def test_masks_touch_only_their_rows_and_never_leave_a_row_empty(engine, smollm2):
    fresh = engine.grammars.matcher(JSON_GRAMMAR)
    broken = engine.grammars.matcher(JSON_GRAMMAR)
    broken.consume_token(smollm2.tokenizer.encode("x", add_special_tokens=False)[0])  # not JSON: error state
    assert broken.is_error()
    bias = engine.grammars.masks([fresh, broken])
    logits = torch.zeros(3, bias.shape[1])
    apply_masks(logits, [0, 2], bias)
    allowed = (logits[0] == 0).nonzero().flatten().tolist()
    assert allowed and all(smollm2.tokenizer.decode([t]).lstrip().startswith("{") for t in allowed)  # JSON object opens
    assert (logits[1] == 0).all()  # a free row is untouched
    assert torch.isfinite(logits[2]).any()  # a matcher in error still leaves a token (EOS): never NaNs


def test_an_invalid_grammar_is_a_clear_400(engine, questions):
    with pytest.raises(InvalidRequest, match="grammar") as err:
        engine.add_request("bad-grammar", questions[0], SamplingParams(grammar="start: %json {\"$ref\": \"#/nope\"}"))
    assert err.value.code == "invalid_grammar"
    assert not engine.has_work()


def test_grammars_are_cached_by_their_text(engine, questions):
    hits = engine.grammars.hits
    generate(engine, questions[:2], constrained(4))
    assert engine.grammars.hits >= hits + 1


def test_batch_mixing_constrained_and_free_sequences(engine, questions):
    """Every other sequence is constrained: those validate, the free ones equal their solo runs."""
    params = [constrained() if i % 2 == 0 else greedy(24) for i in range(len(questions))]
    outs = generate(engine, questions, params)
    for i, (q, out) in enumerate(zip(questions, outs)):
        if i % 2 == 0:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)
        else:
            assert out.token_ids == solo(engine, q, greedy(24)).token_ids


def test_sampled_constrained_replies_validate(engine, questions):
    outs = generate(engine, questions, [constrained(temperature=1.0, seed=i) for i in range(len(questions))])
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_prefix_cache_hit_gives_the_same_constrained_reply(engine, questions):
    engine.pool.reset_cache()
    first = solo(engine, questions[2], constrained())
    again = solo(engine, questions[2], constrained())
    assert again.cached_tokens > 0
    assert again.token_ids == first.token_ids


def test_preemption_keeps_constrained_replies_valid_and_unchanged(smollm2, questions):
    tight = Engine(smollm2, EngineConfig(num_blocks=14))
    roomy = Engine(smollm2, EngineConfig(num_blocks=200))
    outs = generate(tight, questions[:6], constrained())
    assert tight.scheduler.num_preemptions > 0
    for q, out in zip(questions, outs):
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.token_ids == solo(roomy, q, constrained()).token_ids
    assert tight.pool.num_free == tight.pool.num_blocks


def test_adopted_kv_continues_under_the_grammar(smollm2, engine, questions):
    """The prefill node samples the first token under the grammar; the decode node's matcher consumes it."""
    prompt = questions[0]
    local = solo(engine, prompt, constrained())
    prefill_node = Engine(smollm2, EngineConfig(num_blocks=64))
    prefill_node.add_request("p", prompt, constrained(1, ignore_eos=True), hold_blocks=True)
    [first] = [c for c in prefill_node.step() if c.finished]
    source = prefill_node.held.pop("p")
    dest = engine.pool.allocate(len(source))
    engine.pool.kv[dest] = prefill_node.pool.kv[source]
    engine.add_request("adopted", prompt, constrained(),
                       adopted=AdoptedKV(dest, num_computed=len(prompt), first_token=first.token_ids[0]))  # fmt: skip
    out = []
    while engine.has_work():
        for chunk in engine.step():
            out += chunk.token_ids if chunk.request_id == "adopted" else []
    assert out == local.token_ids
    jsonschema.validate(json.loads(local.text), SCHEMA)


def test_mask_computation_overlaps_the_forward(engine, questions):
    """Constrained decode of 8 sequences costs little more than free decode (masks run beside the forward)."""

    def tok_s(params):
        generate(engine, questions, [params] * len(questions))  # warm
        start = time.perf_counter()
        outs = generate(engine, questions, [params] * len(questions))
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)

    free = tok_s(SamplingParams(max_tokens=24, ignore_eos=True))
    forced = tok_s(SamplingParams(max_tokens=24, grammar=JSON_GRAMMAR))
    print(f"8 sequences: free {free:.1f} tok/s, constrained {forced:.1f} tok/s, ratio {forced / free:.2f}")
    assert forced > free * 0.6


def test_a_moved_reply_resumes_its_grammar_where_the_dead_node_left_it(engine, questions):
    """A reply that moves mid-way (gateway/turn.py) arrives as prompt + reply so far, with
    `grammar_resume` = the reply's length: the matcher consumes those tokens first, so the rest is the
    rest of the same JSON (greedy: token for token), not a second JSON object inside the first."""
    whole = solo(engine, questions[0], constrained())
    k = 7
    rest = solo(engine, questions[0] + whole.token_ids[:k], constrained(80 - k, grammar_resume=k))
    assert rest.token_ids == whole.token_ids[k:]
    jsonschema.validate(json.loads(whole.text), SCHEMA)
    not_json = engine.tokenizer.encode("no", add_special_tokens=False)[:1]
    with pytest.raises(InvalidRequest, match="does not match the grammar"):
        solo(engine, questions[0] + not_json, constrained(8, grammar_resume=1))
