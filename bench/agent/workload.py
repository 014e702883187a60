"""Synthetic agent traffic: S sessions x T turns over one shared system prompt and tool list.

Every turn resends the whole conversation plus the assistant's last reply, a tool's output and a
bit of user text: the prompt grows and is almost entirely a prefix of the next one, which is
the pattern prefix-aware routing is for. Session starts are closed-loop (all agents at once) or
a Poisson process; within a session turns are sequential (the next one needs the reply), after a
think time (the tool running: fixed, or exponential under Poisson arrivals, so agents that were
batched together do not stay in lockstep). Long
documents, unrelated to any session, can be mixed in to create head-of-line blocking.

Text is drawn from words that are one token each (with a leading space) in SmolLM2's and other
BPE vocabularies, so a length in words is close to a length in tokens on every system compared.
Each run gets a nonce at the start of its system prompt: modes sharing workers never hit each
other's cache.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec
import numpy as np

WORDS = tuple(
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city community name president team minute idea kid body "
    "information back parent face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education foot boy age policy music market sense nation plan "
    "college interest death experience effect class control care field development role effort rate heart drug show "
    "leader light voice wife police mind price report decision son view relationship town road arm difference value "
    "building action model season society tax director position player record paper space ground form event official "
    "matter center couple site project activity star table need court oil situation cost industry figure street image "
    "phase memory file data server client cache block node route token queue batch stream worker tool agent prompt "
    "layer vector index".split()
)

TOOL_NAMES = ("search_docs", "read_file", "run_tests", "list_dir", "grep", "write_file", "http_get", "sql_query")

Message = dict[str, str]


class AgentWorkload(msgspec.Struct, frozen=True, kw_only=True):
    """Sizes are in words (about one token each); times in seconds."""

    sessions: int = 8
    turns: int = 6
    system_words: int = 400
    tools: int = 6  # tool schemas written into the system prompt
    task_words: int = 24  # each session's first user message
    tool_output_words: int = 200  # appended every turn after the first
    user_words: int = 12
    max_tokens: int = 32
    arrival: Literal["closed", "poisson"] = "closed"
    session_rate_per_s: float = 0.5  # poisson: mean session starts per second
    think_time_s: float = 0.0  # the tool's run time between a reply and the next turn (poisson: its mean)
    long_docs: int = 0  # head-of-line scenario: unrelated long prompts mixed in
    long_doc_words: int = 1500
    long_doc_max_tokens: int = 8
    long_doc_start_s: float = 2.0
    long_doc_gap_s: float = 6.0  # fixed gap (closed) or mean gap (poisson)
    seed: int = 0


class SessionScript(msgspec.Struct, frozen=True):
    """One agent: when it starts, its task, and the user message it appends on each later turn."""

    id: str
    start_s: float
    task: str
    appends: list[str]  # appends[k - 2] is turn k's new user message (tool output + user text)
    think_s: list[float]  # think_s[k - 2]: the tool's run time before turn k

    @property
    def turns(self) -> int:
        return 1 + len(self.appends)


class DocRequest(msgspec.Struct, frozen=True):
    id: str
    at_s: float
    messages: list[Message]
    max_tokens: int


class AgentPlan(msgspec.Struct, frozen=True):
    """Everything the driver sends, fixed before the run (replies are filled in as they arrive)."""

    system: str
    warmup: list[Message]  # sent once before the clock starts: the shared prefix is hot everywhere
    sessions: list[SessionScript]
    docs: list[DocRequest]
    max_tokens: int


def prose(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def tool_schemas(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    return [
        {
            "name": TOOL_NAMES[i % len(TOOL_NAMES)] + ("" if i < len(TOOL_NAMES) else f"_{i}"),
            "description": prose(rng, 12),
            "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": prose(rng, 6)}},
                           "required": ["query"]},  # fmt: skip
        }
        for i in range(n)
    ]


def build_plan(w: AgentWorkload, nonce: str) -> AgentPlan:
    """The same `w` gives the same text in every mode except the nonce (and so the same lengths)."""
    rng = np.random.default_rng(w.seed)
    tools = json.dumps(tool_schemas(rng, w.tools))
    system = (
        f"Agent run {nonce}. You are a careful software agent. {prose(rng, w.system_words)}\n\n"
        f"# Tools\n<tools>{tools}</tools>\nCall a tool by answering with its name and arguments as JSON."
    )
    starts = _arrivals(rng, w.sessions, w.arrival, 0.0, 1.0 / w.session_rate_per_s) if w.arrival == "poisson" else [0.0] * w.sessions
    sessions = []
    for s in range(w.sessions):
        appends = [
            f"Tool {TOOL_NAMES[(s + k) % len(TOOL_NAMES)]} returned:\n{prose(rng, w.tool_output_words)}\n\n{prose(rng, w.user_words)}"
            for k in range(w.turns - 1)
        ]
        think = rng.exponential(w.think_time_s, w.turns - 1) if w.arrival == "poisson" else np.full(w.turns - 1, w.think_time_s)
        sessions.append(SessionScript(f"bench-{nonce}-s{s}", starts[s], prose(rng, w.task_words), appends, think.tolist()))
    doc_times = _arrivals(rng, w.long_docs, w.arrival, w.long_doc_start_s, w.long_doc_gap_s)
    docs = [
        DocRequest(
            f"bench-{nonce}-doc{d}", doc_times[d],
            [{"role": "user", "content": f"Document {nonce}-{d}:\n{prose(rng, w.long_doc_words)}\n\nSummarize the document."}],
            w.long_doc_max_tokens,
        )  # fmt: skip
        for d in range(w.long_docs)
    ]
    warmup = [{"role": "system", "content": system}, {"role": "user", "content": "Reply with OK."}]
    return AgentPlan(system, warmup, sessions, docs, w.max_tokens)


def messages_for(plan: AgentPlan, script: SessionScript, replies: list[str]) -> list[Message]:
    """Turn `len(replies) + 1` of a session: the whole conversation so far, then its new message.

    Assistant replies are echoed exactly as returned, so the gateway's exact-token ledger can
    extend the previous turn's ids instead of re-tokenizing.
    """
    messages = [{"role": "system", "content": plan.system}, {"role": "user", "content": script.task}]
    for reply, append in zip(replies, script.appends):
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": append}]
    return messages


def _arrivals(rng: np.random.Generator, n: int, kind: str, start_s: float, gap_s: float) -> list[float]:
    """`n` arrival times from `start_s`: fixed gaps, or exponential gaps with mean `gap_s`."""
    if n == 0:
        return []
    gaps = rng.exponential(gap_s, n - 1) if kind == "poisson" else np.full(n - 1, gap_s)
    return [float(t) for t in start_s + np.concatenate(([0.0], np.cumsum(gaps)))]


def shared_prefix_tokens(plan: AgentPlan, encode) -> dict[str, int]:
    """Per session: tokens its first turn shares with the warm-up (the system prompt, templated).

    `encode(messages) -> ids` must render like the server does; the first turn can reuse no more
    than this, since nothing else the session sends was seen before it.
    """
    warm = encode(plan.warmup)
    out = {}
    for script in plan.sessions:
        first = encode(messages_for(plan, script, []))
        n = min(len(warm), len(first))
        out[script.id] = next((i for i in range(n) if warm[i] != first[i]), n)
    return out
