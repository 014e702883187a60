"""Guaranteed tool calls and JSON through the real stack (gateway, prefill and decode workers, SmolLM2)
with the openai client: what the grammar promises holds for every reply, sampled at temperature 1.

The stack is the one tests/test_sdk_stack.py starts (shared, started once).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest
from test_sdk_stack import shared_stack

pytestmark = pytest.mark.heavy

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "minimum": 0}, "source": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "target": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["amount", "source", "target"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book_table", "description": "Book a restaurant table", "strict": True,
        "parameters": {"type": "object", "properties": {
            "restaurant": {"type": "string", "maxLength": 40}, "people": {"type": "integer", "minimum": 1, "maximum": 12},
            "vegetarian": {"type": "boolean"}},
            "required": ["restaurant", "people", "vegetarian"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = [
    "What is the weather in {city}?", "How much is 120 dollars in euros?", "Book a table for four at {city} Grill.",
    "I am flying to {city} tomorrow, should I take a coat?", "Convert 3000 yen to pounds.",
    "Reserve dinner for 2 vegetarians at Green {city}.", "Is it raining in {city}?",
    "Please help me plan an evening in {city}.", "How many kroner is 50 euros?", "Table for the whole team, 9 of us, at Luigi's.",
]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Kyoto", "Quito", "Perth", "Porto", "Dakar", "Riga"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shared_stack(request.config).url}/v1", api_key="none", max_retries=0, timeout=300)


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": ASKS[i % len(ASKS)].format(city=CITIES[(i // len(ASKS)) % len(CITIES)])}]


def required_call(client: openai.OpenAI, i: int, stream: bool) -> list[tuple[str, str]]:
    """(name, arguments) of each call in the reply, streamed or not."""
    kw = dict(model="smollm2", messages=ask(i), tools=TOOLS, tool_choice="required", temperature=1.0, seed=i, max_tokens=200)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(d.index, ["", ""])
                entry[0] += d.function.name or "" if d.function else ""
                entry[1] += d.function.arguments or "" if d.function else ""
    assert finish == "tool_calls"
    return [tuple(v) for _, v in sorted(calls.items())]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_tool_calls_are_always_listed_tools_with_valid_arguments(client, stream):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: required_call(client, i, stream), range(25)))
    valid = 0
    for calls in replies:
        assert calls
        for name, arguments in calls:
            assert name in SCHEMAS, name
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        valid += 1
    print(f"required tool calls ({'streamed' if stream else 'whole'}): {valid}/25 valid")
    assert valid == 25


def test_json_schema_replies_always_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(i: int) -> dict:
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Describe a person from {CITIES[i % 10]} as JSON."}],
            response_format=fmt, temperature=1.0, seed=i, max_tokens=200)  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        return json.loads(reply.choices[0].message.content)

    with ThreadPoolExecutor(8) as pool:
        docs = list(pool.map(one, range(50)))
    for doc in docs:
        jsonschema.validate(doc, PERSON)
    print(f"json_schema strict: {len(docs)}/50 valid")


def test_json_object_is_a_json_object(client):
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "List two colours."}],
                                           response_format={"type": "json_object"}, max_tokens=120, temperature=0)  # fmt: skip
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population: int = pydantic.Field(ge=0, le=100_000_000)


def test_the_openai_sdk_parse_returns_a_parsed_object(client):
    reply = client.chat.completions.parse(model="smollm2", messages=[{"role": "user", "content": "Lisbon: name, country and population?"}],
                                          response_format=City, max_tokens=200, temperature=0)  # fmt: skip
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


class Point(pydantic.BaseModel):
    x: int = pydantic.Field(ge=-100, le=100)
    y: int = pydantic.Field(ge=-100, le=100)


class Distance(pydantic.BaseModel):
    """Distance between two points."""

    a: Point
    b: Point


def test_a_tool_with_nested_models_gets_calls_that_parse(client):
    """pydantic writes a nested model as {"$ref": "#/$defs/Point"}: the grammar resolves it in the tool's
    own parameters (it used to be a 400), and every forced call parses back into the models."""
    tool = openai.pydantic_function_tool(Distance)
    assert "$defs" in tool["function"]["parameters"]

    def one(i: int) -> Distance:
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"How far is ({i}, 3) from (4, {i + 1})?"}],
            tools=[tool], tool_choice="required", temperature=1.0, seed=i, max_tokens=120)  # fmt: skip
        calls = reply.choices[0].message.tool_calls
        assert calls and all(c.function.name == "Distance" for c in calls)
        return [Distance.model_validate_json(c.function.arguments) for c in calls]

    with ThreadPoolExecutor(4) as pool:
        assert all(list(pool.map(one, range(8))))


def test_a_grammar_request_reuses_the_cached_prefix_of_the_same_request_without_one(client):
    messages = [{"role": "system", "content": "You are a travel agent. " * 12}, *ask(3)]
    plain = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0)  # fmt: skip
    forced = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, tool_choice="required",
                                            max_tokens=120, temperature=0)  # fmt: skip
    assert plain.usage.prompt_tokens == forced.usage.prompt_tokens  # the same rendered conversation
    full_blocks = forced.usage.prompt_tokens // 16 * 16
    assert forced.usage.prompt_tokens_details.cached_tokens >= full_blocks - 16
    assert forced.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}, "strict": True}}},
         '"not"'),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
         "not a valid JSON Schema"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]},
         "answers no tool call"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}}, "accepts no reply"),
    ],
)  # fmt: skip
def test_what_cannot_be_enforced_is_a_clear_400(client, extra, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(**{"model": "smollm2", "messages": ask(0), "max_tokens": 4, **extra})
