"""Two gateways on one Redis serve the same sessions (issue 16 item 1): a session whose turns
alternate between them keeps its exact-token ledger, its affinity and its cache hits, because every
piece of session state lives in Redis and each gateway's own load accounting only corrects reports.

Real processes: the shared stack (Valkey, prefill and decode workers, gateway A) and a second
gateway B started here on the same Valkey with the same cluster token; the openai client."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from agentkv.stack import free_port
from tests.test_sdk_stack import shared_stack

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def two_gateways(request: pytest.FixtureRequest, tmp_path_factory):
    stack = shared_stack(request.config)
    port = free_port()
    log = tmp_path_factory.mktemp("gateway-b") / "gateway.log"
    env = {**os.environ, "AGENTKV_CLUSTER_TOKEN": stack.cluster_token}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "agentkv.cli", "gateway", "--port", str(port), "--redis-url",
                                    stack.valkey.url, "--namespace", stack.namespace], stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway B did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield stack.url, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_session_alternating_between_two_gateways_keeps_its_ledger_and_its_cache(two_gateways):
    clients = [OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) for url in two_gateways]
    messages = [{"role": "system", "content": "You are a terse assistant. " + "Keep every answer short. " * 20},
                {"role": "user", "content": "Name a colour."}]  # fmt: skip
    session = f"active-active-{time.time_ns()}"
    rows = []
    for turn in range(4):
        client = clients[turn % 2]
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                               extra_headers={"x-session-id": session})  # fmt: skip
        stats = reply.usage.model_extra["agentkv"]
        rows.append((turn, stats["ledger"], reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens,
                     stats["decode_node"]))  # fmt: skip
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"And another one, number {turn + 2}."}]  # fmt: skip
    print("\nturn  gateway  ledger    prompt  cached  decode node")
    for turn, ledger, prompt, cached, node in rows:
        print(f"{turn + 1:>4}  {'AB'[turn % 2]:>7}  {ledger or '-':<8}  {prompt:>6}  {cached:>6}  {node}")
    for (turn, ledger, prompt, cached, node), previous in zip(rows[1:], rows):
        assert ledger == "extended", f"turn {turn + 1} re-tokenized the conversation on the other gateway"
        # The previous prompt and reply are cached (all but its partial last block and the reply's last token).
        assert cached >= 0.9 * previous[2], f"turn {turn + 1}: {cached} of the previous {previous[2]} prompt tokens cached"
        assert node == previous[4], "the session's affinity was lost between gateways"
    # Both gateways list the session (state in Redis, not in one gateway).
    listed = [{s["id"] for s in httpx.get(f"{url}/v1/sessions", timeout=10).json()["data"]} for url in two_gateways]
    assert all(session in ids for ids in listed)
