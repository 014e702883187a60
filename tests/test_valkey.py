"""The embedded Valkey and the connect helper: a real server that never outlives us, clear errors."""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from kvstore.valkey import EmbeddedValkey, EmbeddedValkeyError, RedisUnavailable, connect, redact


def process_exists(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_embedded_valkey_answers_and_leaves_no_process_or_directory_after_stop():
    with EmbeddedValkey() as valkey:
        pid, data_dir = valkey.pid, valkey._dir
        assert redis.Redis.from_url(valkey.url).ping() is True
        assert redis.Redis.from_url(valkey.url).config_get("save") == {"save": ""}  # no persistence
    assert not process_exists(pid)
    assert not data_dir.exists()
    valkey.stop()  # idempotent


def test_embedded_valkey_stops_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with EmbeddedValkey() as valkey:
            pid = valkey.pid
            raise RuntimeError("boom")
    assert not process_exists(pid)


def test_embedded_valkey_started_on_the_event_loop_thread_serves_connect():
    async def body():
        with EmbeddedValkey() as valkey:
            client = await connect(valkey.url)
            assert await client.ping() is True
            await client.aclose()
            return valkey.pid

    assert not process_exists(asyncio.run(body()))


def test_embedded_valkey_on_a_port_in_use_says_so(valkey_url):
    port = int(valkey_url.rsplit(":", 1)[1])
    with pytest.raises(EmbeddedValkeyError, match=f"127.0.0.1:{port} is already in use"):
        EmbeddedValkey(port=port).start()


def test_connect_to_an_unreachable_server_raises_one_line_without_the_password():
    with pytest.raises(RedisUnavailable) as caught:
        asyncio.run(connect("redis://agent:s3cret@127.0.0.1:1/0", timeout_s=1.0))
    message = str(caught.value)
    assert "redis://agent:***@127.0.0.1:1/0" in message
    assert "s3cret" not in message and "\n" not in message


def test_connect_with_a_wrong_password_raises_redis_unavailable(valkey_url):
    wrong = valkey_url.replace("redis://", "redis://nobody:wrong@")
    with pytest.raises(RedisUnavailable, match="nobody:\\*\\*\\*@"):
        asyncio.run(connect(wrong, timeout_s=1.0))


def test_connect_accepts_the_valkey_scheme(valkey_url):
    async def body():
        client = await connect(valkey_url.replace("redis://", "valkey://"))
        assert await client.ping() is True
        await client.aclose()

    asyncio.run(body())


def test_redact_hides_only_the_password():
    assert redact("rediss://user:pw@host:6380/2") == "rediss://user:***@host:6380/2"
    assert redact("redis://:pw@host") == "redis://:***@host"
    assert redact("redis://host:6379") == "redis://host:6379"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_embedded_valkey_dies_with_a_process_killed_without_cleanup():
    script = (
        "import os, signal\n"
        "from kvstore.valkey import EmbeddedValkey\n"
        "v = EmbeddedValkey().start()\n"
        "print(v.pid, v._dir, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(_PR_SET_CHILD_SUBREAPER, 1)  # the orphaned server becomes our child, so we can reap it
    try:
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
        pid, data_dir = int(child.stdout.split()[0]), Path(child.stdout.split()[1])
        shutil.rmtree(data_dir, ignore_errors=True)  # nobody else will: the child was killed
        deadline = time.monotonic() + 5
        while process_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_exists(pid)
    finally:
        prctl(_PR_SET_CHILD_SUBREAPER, 0)
    os.waitpid(pid, 0)


_PR_SET_CHILD_SUBREAPER = 36


def test_a_durable_embedded_valkey_keeps_its_data_across_a_kill_and_restart(tmp_path):
    valkey = EmbeddedValkey(data_dir=tmp_path / "data").start()
    try:
        client = redis.Redis.from_url(valkey.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.set("akv:session:alice:s1", b"turn 3")
        client.close()
        time.sleep(1.5)  # appendfsync everysec: what is older than a second is on disk
        port, old_pid = valkey.port, valkey.pid
        os.kill(old_pid, 9)
        deadline = time.monotonic() + 5
        while valkey.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert valkey.exit_code() == -9
        started = time.monotonic()
        valkey.restart()
        restart_s = time.monotonic() - started
        assert valkey.port == port and valkey.pid != old_pid and restart_s < 5
        client = redis.Redis.from_url(valkey.url)
        assert client.get("akv:session:alice:s1") == b"turn 3"
        client.close()
    finally:
        valkey.stop()
    assert (tmp_path / "data").is_dir()  # a data directory is the caller's: kept


def test_an_ephemeral_embedded_valkey_has_no_persistence():
    with EmbeddedValkey() as valkey:
        client = redis.Redis.from_url(valkey.url)
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
