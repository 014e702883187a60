"""agentkv from the plain `openai` SDK: nothing but a base URL and an `X-Session-Id` header.

    agentkv up                          # in another terminal
    python examples/openai_client.py    # [--base-url http://127.0.0.1:8000]

A three-turn conversation (one streamed turn) in one session. The session header lets the
gateway continue the session's exact token history and send each turn to the node that still
holds its KV cache: `usage.prompt_tokens_details.cached_tokens` shows how much of each prompt
was not recomputed, and `usage.agentkv` where the turn ran (the gateway's RouteStats). Any OpenAI-compatible client works the same way; most agent frameworks take
`default_headers` (or send a session header of their own, which the gateway also accepts).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from openai import OpenAI

QUESTIONS = ["Name one planet of the solar system.", "Name another one.", "Which of the two is larger?"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("AGENTKV_BASE_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args(argv)

    session_id = f"openai-example-{uuid.uuid4().hex[:8]}"
    client = OpenAI(
        base_url=f"{args.base_url.rstrip('/')}/v1",
        api_key=os.environ.get("AGENTKV_API_KEY", "unused-when-the-gateway-is-open"),
        default_headers={"X-Session-Id": session_id},
    )
    model = client.models.list().data[0].id
    messages: list[dict] = [{"role": "system", "content": "You are a concise assistant. Answer in one sentence."}]
    usages = []
    for n, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        if n < len(QUESTIONS) - 1:
            response = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
            answer, usage = response.choices[0].message.content, response.usage
        else:  # the last turn streamed, with usage in the final chunk
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})  # fmt: skip
            parts, usage = [], None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
            answer = "".join(parts)
        messages.append({"role": "assistant", "content": answer})
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        route = (usage.model_extra or {}).get("agentkv", {})  # the gateway's per-turn RouteStats
        usages.append({"prompt_tokens": usage.prompt_tokens, "cached_tokens": cached, "completion_tokens": usage.completion_tokens})
        print(f"user: {question}\nassistant: {answer}\n  [{usage.prompt_tokens} prompt tokens, {cached} cached, "
              f"decode node {route.get('decode_node', '?')}]\n", flush=True)  # fmt: skip
    return usages


if __name__ == "__main__":
    main()
    sys.exit(0)
