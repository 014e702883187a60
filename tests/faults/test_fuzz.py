"""A schema-driven fuzzer (schemathesis) over the gateway's own /schema/openapi.json, against the real stack.

For every operation, inputs the document allows (positive) and inputs it forbids (negative): no answer
is a 5xx, every status, content type and body is one the document declares, and what the document
forbids is refused with a 4xx. Bounded: a fixed number of examples per operation and mode, no
shrinking, and every generation request asks for at most a few tokens (the model runs on 2 CPU
cores), so the whole run stays within ~2 minutes. The counts are printed (`pytest -s`).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_sdk_stack import stack_url  # noqa: F401 (the shared real stack)

pytestmark = pytest.mark.heavy

EXAMPLES = {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 25}  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, negative_data_rejection]
MAX_NEW_TOKENS = 4
DEADLINE_S = 30.0  # a 4-token turn takes well under a second: longer is a hang
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
EXCLUDED_PREFIXES: tuple[str, ...] = ()  # operations whose document is not finished (none)


def bound_generation(case: schemathesis.Case) -> None:
    """Keep each turn short: cap a valid token budget, and set one where the request has none
    (the default would be 256 tokens). An invalid budget is left as generated (a negative case)."""
    body = case.body
    if not isinstance(body, dict) or case.method.upper() != "POST" or case.path.startswith("/v1/sessions"):
        return
    for key in TOKEN_FIELDS:
        value = body.get(key)
        if value is None and key in body:  # null means the default (256): as good as absent
            del body[key]
        elif isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS:
            body[key] = MAX_NEW_TOKENS
    if not any(k in body for k in TOKEN_FIELDS):
        body["max_output_tokens" if case.path.startswith("/v1/responses") else "max_tokens"] = MAX_NEW_TOKENS


def test_the_gateway_answers_what_its_openapi_document_says(stack_url):  # noqa: F811
    schema = schemathesis.openapi.from_url(f"{stack_url}/schema/openapi.json")
    statuses: Counter[int] = Counter()
    by_operation: Counter[tuple[str, str, int]] = Counter()
    refused_valid: list[str] = []  # what the document allows but the gateway refused (limits it cannot express)
    failures: list[str] = []
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith(EXCLUDED_PREFIXES):
            continue
        for mode, examples in EXAMPLES.items():

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: schemathesis.Case) -> None:
                bound_generation(case)
                try:
                    response = case.call(base_url=stack_url, timeout=DEADLINE_S)
                except requests.RequestException as exc:  # a hang or a dropped connection: the worst outcome
                    failures.append(f"{operation.label} [{mode.value}] -> no answer: {type(exc).__name__}\n  body: {case.body!r:.600}")
                    return
                statuses[response.status_code] += 1
                by_operation[(operation.label, mode.value, response.status_code)] += 1
                if mode is GenerationMode.POSITIVE and response.status_code == 400:
                    refused_valid.append(f"{operation.label}: {response.json()['error']['message'][:150]}")
                try:
                    case.validate_response(response, checks=CHECKS)
                except (FailureGroup, AssertionError) as exc:  # collected: every failure is reported at the end
                    failures.append(f"{operation.label} [{mode.value}] -> {response.status_code}: {exc}\n  body: {case.body!r:.300}")

            try:
                fuzz()
            except Unsatisfiable:  # nothing to get wrong (e.g. a negative GET /health: no parameters at all)
                assert mode is GenerationMode.NEGATIVE, operation.label
    took = time.monotonic() - started
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nfuzz: {sum(statuses.values())} requests in {took:.0f} s, statuses {dict(sorted(statuses.items()))}, "
          f"{server_errors} 5xx, {len(failures)} failures")  # fmt: skip
    for key, n in sorted(by_operation.items()):
        print(f"  {key[0]} [{key[1]}] {key[2]}: {n}")
    for line in sorted(set(refused_valid))[:25]:
        print(f"  valid but refused: {line}")
    for line in failures:
        print(f"FAILURE {line}")
    assert not failures, "\n".join(failures[:20])
    assert server_errors == 0
