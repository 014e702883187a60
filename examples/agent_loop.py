"""A multi-turn tool-calling agent on agentkv, written with the agentkv SDK.

    agentkv up                       # in another terminal
    python examples/agent_loop.py    # [--base-url http://127.0.0.1:8000] [--json]

Three questions, each answered by a real Python tool (a file's line count, a product, the clock),
in one server-side session: every model call resends the whole conversation, and the table at
the end shows how much of it the gateway found already cached. `agentkv demo` runs this file.

The model behind `agentkv up` is SmolLM2-135M: tiny, so the session helps it the way one helps any
small model. A few worked examples in the history show the call format (far more reliable than
the JSON schema alone), and `tool_choice` names the tool for the first step of each question;
`run()` then lets the model answer from the tool's result (its last step is sent with
tool_choice="none"). Larger models need neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from agentkv import Client, RunResult, Session, tool

PROJECT = Path(__file__).resolve().parents[1]


@tool
def count_lines(path: str) -> int:
    """Count the lines of a text file in this project.

    Args:
        path: The file's path relative to the project root, e.g. README.md.
    """
    target = (PROJECT / path).resolve()
    if PROJECT not in target.parents:
        raise ValueError(f"{path!r} is outside the project")
    with target.open(encoding="utf-8", errors="replace") as f:
        return sum(1 for _ in f)


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers exactly (small models are bad at arithmetic).

    Args:
        a: The first number.
        b: The second number.
    """
    product = a * b
    return int(product) if float(product).is_integer() else product


@tool
def current_time(timezone: str = "UTC") -> str:
    """The current date and time in a time zone.

    Args:
        timezone: An IANA time zone name, e.g. UTC or Europe/Paris.
    """
    return datetime.now(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M %Z")


TOOLS = [count_lines, multiply, current_time]
SYSTEM = "You are a helpful assistant with tools. Call a tool when it helps, then answer in one short sentence using its result."


def _example(n: int, question: str, name: str, arguments: dict, output: str, answer: str) -> list[dict]:
    call_id = f"call_example_{n}"
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": output},
        {"role": "assistant", "content": answer},
    ]


# Worked examples (made-up outputs): they show the model how a call and an answer look.
EXAMPLES = [
    *_example(1, "Use count_lines: how many lines does setup.cfg have?", "count_lines", {"path": "setup.cfg"}, "12", "setup.cfg has 12 lines."),
    *_example(2, "Use multiply: what is 6 * 7?", "multiply", {"a": 6, "b": 7}, "42", "6 * 7 is 42."),
    *_example(3, "Use current_time: what time is it in Europe/Paris?", "current_time", {"timezone": "Europe/Paris"},
              "2024-01-01 09:30 CET", "In Europe/Paris it is 2024-01-01 09:30 CET."),
]  # fmt: skip

# (question, the tool for its first step). Naming the tool in the question helps the 135M model too.
QUESTIONS = [
    ("Use count_lines: how many lines does README.md have?", "count_lines"),
    ("Use multiply: what is 37 * 91?", "multiply"),
    ("Use current_time: what time is it in UTC?", "current_time"),
]


def run_session(client: Client, *, max_tokens: int = 48, on_answer=None) -> Session:
    """Ask every question in one session; `on_answer(question, RunResult)` after each."""
    session = client.session(system=SYSTEM, tools=TOOLS, temperature=0, max_tokens=max_tokens)
    session.messages += EXAMPLES
    for question, tool_name in QUESTIONS:
        result = session.run(question, tool_choice=tool_name, max_steps=2)
        if on_answer is not None:
            on_answer(question, result)
    return session


def print_answer(question: str, result: RunResult) -> None:
    print(f"user: {question}")
    for r in result.tool_results:
        print(f"  tool {r.call.name}({r.call.arguments}) -> {r.content}")
    print(f"assistant: {result.content}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("AGENTKV_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--json", action="store_true", help="print the per-turn stats as one JSON object")
    args = parser.parse_args(argv)
    with Client(args.base_url) as client:
        session = run_session(client, on_answer=None if args.json else print_answer)
        session.delete()
    turns = [t.as_dict() for t in session.turns]
    if args.json:
        print(json.dumps({"turns": turns}))
    else:
        print("turn  prompt  cached  prefilled  transferred  completion  ttft_s")
        for n, t in enumerate(turns, 1):
            print(f"{n:>4}  {t['prompt_tokens']:>6}  {t['cached_tokens']:>6}  {t['prefilled_tokens'] or 0:>9}  "
                  f"{t['transferred_tokens']:>11}  {t['completion_tokens']:>10}  {t['ttft_s']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
