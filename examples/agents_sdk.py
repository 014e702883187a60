"""agentkv under the OpenAI Agents SDK, in chat-completions mode, with a real Python tool.

    agentkv up                      # in another terminal
    python examples/agents_sdk.py   # [--base-url http://127.0.0.1:8000]

The Agents SDK talks to any OpenAI-compatible server through `OpenAIChatCompletionsModel` and an
`AsyncOpenAI(base_url=...)`; the `X-Session-Id` header makes its turns one agentkv session, so the
second model call (after the tool ran) reuses the first call's KV cache. Tracing is disabled: it
would upload traces to OpenAI.

For the 135M model behind `agentkv up`, the input starts with one worked example (a tool call and
its answer) and the first call must use a tool (`tool_choice="required"`; the SDK resets it to
auto after the tool ran, so the agent then answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

TEMPERATURES = {"paris": 23, "london": 16, "rome": 18, "oslo": 4}


@function_tool
def get_temperature(city: str) -> str:
    """Get the current temperature in a city, in degrees Celsius.

    Args:
        city: The city name, e.g. Paris.
    """
    degrees = TEMPERATURES.get(city.strip().lower())
    return f"{degrees} degrees Celsius in {city}" if degrees is not None else f"no data for {city}"


EXAMPLE = [
    {"role": "user", "content": "Use get_temperature: how warm is it in Madrid?"},
    {"type": "function_call", "call_id": "call_example_1", "name": "get_temperature", "arguments": json.dumps({"city": "Madrid"})},
    {"type": "function_call_output", "call_id": "call_example_1", "output": "30 degrees Celsius in Madrid"},
    {"role": "assistant", "content": "It is 30 degrees Celsius in Madrid."},
]


async def run(base_url: str, question: str = "Use get_temperature: how warm is it in Paris?") -> str:
    set_tracing_disabled(True)
    client = AsyncOpenAI(
        base_url=f"{base_url.rstrip('/')}/v1",
        api_key=os.environ.get("AGENTKV_API_KEY", "unused-when-the-gateway-is-open"),
        default_headers={"X-Session-Id": f"agents-sdk-example-{uuid.uuid4().hex[:8]}"},
    )
    model_name = (await client.models.list()).data[0].id
    agent = Agent(
        name="weather",
        instructions="You are a helpful assistant with tools. Call a tool when it helps, then answer in one short sentence.",
        tools=[get_temperature],
        model=OpenAIChatCompletionsModel(model=model_name, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=48),
    )
    result = await Runner.run(agent, [*EXAMPLE, {"role": "user", "content": question}], max_turns=4)
    await client.close()
    return str(result.final_output)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("AGENTKV_BASE_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args(argv)
    answer = asyncio.run(run(args.base_url))
    print(answer)
    return answer


if __name__ == "__main__":
    main()
