"""The vLLM column of `agentkv bench engine` (bench.engine_vllm): the rate arithmetic on recorded
chunk times, and one small real run against vLLM's CPU build from .venv-vllm."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest

from agentkv.stack import StackError
from bench.engine_vllm import Stream, decode_rates, group_alive, measure_vllm, vllm_bench_server


def test_decode_rate_counts_only_tokens_after_every_stream_has_started():
    # stream a starts at t=1 and decodes 1 token/s; stream b's first token comes at t=3
    a = Stream(chunks=[(1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1), (5.0, 1)])
    b = Stream(chunks=[(3.0, 1), (4.0, 1), (5.0, 1), (6.0, 1), (7.0, 1)])
    to_last, full_batch = decode_rates([a, b])
    assert to_last == pytest.approx(6 / 4)  # a's 4, 5 and b's 4..7 over t 3..7
    assert full_batch == pytest.approx(4 / 2)  # t 3..5, both decoding: a's 4, 5 and b's 4, 5


def test_multi_token_chunks_count_every_token():
    a = Stream(chunks=[(1.0, 1), (2.0, 3), (3.0, 2)])
    assert decode_rates([a]) == (pytest.approx(5 / 2), pytest.approx(5 / 2))
    assert a.gaps() == [(1.0, 2.0), (2.0, 3.0)]


def test_a_server_that_never_serves_is_stopped_with_its_whole_process_group(tmp_path):
    # a stand-in "interpreter" that starts a grandchild and never answers /health
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pgid\nsleep 120 &\nsleep 120\n")
    fake.chmod(0o755)
    with pytest.raises(StackError, match="not ready"):
        with vllm_bench_server(str(fake), tmp_path, tmp_path / "logs", core=0, frontend=(0,), block_size=32,
                               kv_cache_bytes=2**20, max_model_len=64, timeout_s=1.5):  # fmt: skip
            pass
    assert not group_alive(int((tmp_path / "pgid").read_text()))


def _vllm_python() -> str | None:
    for candidate in (os.environ.get("AGENTKV_VLLM_PYTHON"), Path(__file__).parents[1] / ".venv-vllm/bin/python"):
        if candidate and shutil.which(str(candidate)):
            return str(candidate)
    return None


@pytest.mark.heavy
def test_measure_vllm_small_run_reports_every_figure_and_stops_the_server(tmp_path):
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM interpreter: set AGENTKV_VLLM_PYTHON (make test builds .venv-vllm)")
    from workers.loader import resolve_model_path

    model_dir = Path(resolve_model_path("smollm2")[0])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def prompts(n: int, length: int, seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]

    core = sorted(os.sched_getaffinity(0))[0]
    result = measure_vllm(python, model_dir, core=core, log_dir=tmp_path, batches=(1, 2), context=64, new_tokens=8,
                          long_prompt=256, itl_batch=2, prompts=prompts)  # fmt: skip

    assert result["engine"] == "vllm" and result["dtype"] == "float32" and result["version"].startswith("0.")
    assert set(result["decode_tok_s"]) == {"1", "2"}
    rates = [*result["decode_tok_s"].values(), result["prefill_tok_s"], result["ttft_2048_s"], result["itl_p50_alone_s"],
             result["itl_p99_alone_s"], result["itl_p99_with_prefill_s"], result["itl_with_prefill_vs_alone"]]  # fmt: skip
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in rates), result
    assert result["prefill_tok_s"] == pytest.approx(256 / result["ttft_2048_s"])
    assert result["itl_gaps_alone"] > 0 and result["itl_gaps_with_prefill"] > 0 and result["itl_streams_outlasted_prefill"]
    settings = result["settings"]
    assert settings["core"] == core and settings["block_size"] == 32 and settings["context"] == 64
    assert settings["new_tokens"] == 8 and settings["max_num_batched_tokens"] > 0 and settings["enable_chunked_prefill"]
    assert [cores for name, cores in settings["pinned"].items() if "Worker" in name] == [[core]]
    assert core not in settings["frontend_cores"] or len(os.sched_getaffinity(0)) == 1
    assert not group_alive(settings["server_pgid"])  # the API server, its EngineCore and worker are all gone
