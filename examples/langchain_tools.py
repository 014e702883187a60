"""agentkv under LangChain: `ChatOpenAI(base_url=...)`, `bind_tools`, and a plain tool loop.

    agentkv up                          # in another terminal
    python examples/langchain_tools.py  # [--base-url http://127.0.0.1:8000]

`ChatOpenAI` is LangChain's OpenAI chat model; pointed at the gateway it needs nothing else. The
`X-Session-Id` header makes the loop's calls one agentkv session (each call resends the history,
and the gateway finds it cached). The loop is the textbook one: invoke, run the tool calls, append
`ToolMessage`s, invoke again until the model answers without calls.

For the 135M model behind `agentkv up` the history starts with one worked example, and the first
call must use a tool (`tool_choice="required"`); the later calls may answer (tool_choice auto).
"""

from __future__ import annotations

import argparse
import os
import uuid

import httpx
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

STOCK = {"apples": 42, "pears": 7, "plums": 0}


@tool
def check_stock(item: str) -> str:
    """How many units of an item are in stock.

    Args:
        item: The item name, e.g. apples.
    """
    count = STOCK.get(item.strip().lower())
    return f"{count} {item} in stock" if count is not None else f"{item} is not sold here"


EXAMPLE: list[BaseMessage] = [
    HumanMessage("Use check_stock: how many lemons are in stock?"),
    AIMessage("", tool_calls=[{"name": "check_stock", "args": {"item": "lemons"}, "id": "call_example_1", "type": "tool_call"}]),
    ToolMessage("12 lemons in stock", tool_call_id="call_example_1"),
    AIMessage("There are 12 lemons in stock."),
]


def run(base_url: str, question: str = "Use check_stock: how many pears are in stock?", max_steps: int = 3) -> tuple[str, list[BaseMessage]]:
    base_url = f"{base_url.rstrip('/')}/v1"
    api_key = os.environ.get("AGENTKV_API_KEY", "unused-when-the-gateway-is-open")
    model = httpx.get(f"{base_url}/models", headers={"authorization": f"Bearer {api_key}"}).json()["data"][0]["id"]
    llm = ChatOpenAI(
        base_url=base_url,
        api_key=api_key,
        model=model,
        temperature=0,
        max_tokens=48,
        default_headers={"X-Session-Id": f"langchain-example-{uuid.uuid4().hex[:8]}"},
    )
    tools = {"check_stock": check_stock}
    first, later = llm.bind_tools(list(tools.values()), tool_choice="required"), llm.bind_tools(list(tools.values()))
    messages: list[BaseMessage] = [
        SystemMessage("You are a helpful assistant with tools. Call a tool when it helps, then answer in one short sentence."),
        *EXAMPLE,
        HumanMessage(question),
    ]
    for step in range(max_steps):
        reply = (first if step == 0 else later).invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return str(reply.content), messages
        for call in reply.tool_calls:
            fn = tools.get(call["name"])
            if fn is None:  # a hallucinated name: tell the model instead of crashing
                messages.append(ToolMessage(f"Error: unknown tool {call['name']!r}", tool_call_id=call["id"], status="error"))
            else:
                messages.append(fn.invoke(call))  # a ToolCall in -> a ToolMessage out
    return "(no answer within max_steps)", messages


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("AGENTKV_BASE_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args(argv)
    answer, _ = run(args.base_url)
    print(answer)
    return answer


if __name__ == "__main__":
    main()
