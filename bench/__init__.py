"""Benchmarks: each module has `run(...) -> dict` that the CLI prints (`agentkv bench ... --json`)."""
