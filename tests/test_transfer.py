"""Block reads between real processes, for both backends (NIXL, and ucxx when it is installed).

Each peer is a separate OS process (tests/transfer_peer.py) with its own pool whose blocks carry
a pattern unique to (process seed, block id), so "exactly these blocks changed, to exactly those
bytes" is checked by comparing per-block digests before and after.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.transfer_peer import BLOCK_SHAPE, PeerError, PeerProcess
from workers.transfer import make_transport
from workers.transfer.base import InvalidBlocks, PeerInfo, coalesce, describe, pair_ids

BACKENDS = ("nixl", pytest.param("ucxx", marks=pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None, reason="the [ucxx] extra is not installed")))
BLOCK_NBYTES = int(np.prod(BLOCK_SHAPE)) * 4
NUM_BLOCKS = 32

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request):
    """Processes A (reader, seed 1) and B (source, seed 2); A has loaded B."""
    a = PeerProcess(request.param, "A", seed=1, num_blocks=NUM_BLOCKS)
    b = PeerProcess(request.param, "B", seed=2, num_blocks=NUM_BLOCKS)
    a.ready(), b.ready()
    a.call("add_peer", "B", 1, b.metadata)
    yield request.param, a, b
    a.stop(), b.stop()


def changed(before: list[str], after: list[str]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(before, after)) if x != y]


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


# -- moving bytes -----------------------------------------------------------------------------------
def test_read_pulls_exactly_the_named_blocks_and_tells_the_source(pair):
    _, a, b = pair
    remote, local = list(range(0, 5)), list(range(27, 32))
    a_before, b_digests = a.call("digests"), b.call("digests")
    a_count, b_count = a.call("counters"), b.call("counters")

    assert a.call("read", "B", remote, local, b"r-1", 10.0) is None  # returns once the data is here

    a_after = a.call("digests")
    assert changed(a_before, a_after) == local
    assert [a_after[x] for x in local] == [b_digests[y] for y in remote]
    assert b.call("wait_notif", b"r-1", 10.0) == b"r-1"
    assert b.call("digests") == b_digests  # reading never modifies the source
    assert delta(a.call("counters"), a_count) == {
        "reads": 1, "blocks_read": 5, "bytes_read": 5 * BLOCK_NBYTES, "blocks_served": 0, "bytes_served": 0,
        "notifications": 0, "failures": 0}
    assert delta(b.call("counters"), b_count) == {
        "reads": 0, "blocks_read": 0, "bytes_read": 0, "blocks_served": 5, "bytes_served": 5 * BLOCK_NBYTES,
        "notifications": 1, "failures": 0}


def test_a_partial_read_with_scattered_ids_pairs_them_one_to_one(pair):
    """Runs, singletons and a descending sequence: coalescing must not reorder or merge wrongly."""
    _, a, b = pair
    remote = [0, 1, 2, 7, 9, 10, 11, 31]
    local = [30, 31, 5, 6, 14, 13, 12, 0]
    a_before, b_digests = a.call("digests"), b.call("digests")

    a.call("read", "B", remote, local, b"r-scatter", 10.0)
    b.call("wait_notif", b"r-scatter", 10.0)

    a_after = a.call("digests")
    assert changed(a_before, a_after) == sorted(local)
    assert [a_after[x] for x in local] == [b_digests[y] for y in remote]


def test_notify_reaches_the_peer_without_moving_data(pair):
    _, a, b = pair
    before = b.call("digests"), a.call("digests")
    b_count = b.call("counters")
    a.call("notify", "B", b"had-every-block")
    assert b.call("wait_notif", b"had-every-block", 10.0) == b"had-every-block"
    assert (b.call("digests"), a.call("digests")) == before
    assert delta(b.call("counters"), b_count)["notifications"] == 1


def test_a_notification_never_sent_never_arrives(pair):
    _, _, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerError) as err:
        b.call("wait_notif", b"never-sent", 0.5)
    assert err.value.kind == "TimeoutError"
    assert time.monotonic() - t0 < 5


def test_out_of_range_and_mismatched_ids_are_refused_before_sending(pair):
    _, a, _ = pair
    failures = a.call("counters")["failures"]
    for remote, local in (([0, 1], [0]), ([NUM_BLOCKS], [0]), ([0], [NUM_BLOCKS]), ([3, 4], [1, 1]), ([], [])):
        with pytest.raises(PeerError) as err:
            a.call("read", "B", remote, local, b"bad", 5.0)
        assert err.value.kind == "InvalidBlocks"
    assert a.call("counters")["failures"] == failures  # nothing was sent


def test_an_unknown_peer_is_refused(pair):
    _, a, _ = pair
    for command in (("read", "nobody", [0], [0], b"x", 5.0), ("notify", "nobody", b"x")):
        with pytest.raises(PeerError) as err:
            a.call(*command)
        assert err.value.kind == "UnknownPeer"


def test_metadata_for_another_node_or_generation_is_rejected(pair):
    _, a, b = pair
    with pytest.raises(PeerError) as err:
        a.call("add_peer", "C", 1, b.metadata)  # registry says C, metadata says B
    assert err.value.kind == "IncompatiblePeer"
    with pytest.raises(PeerError) as err:
        a.call("add_peer", "B", 7, b.metadata)
    assert err.value.kind == "IncompatiblePeer"
    with pytest.raises(PeerError) as err:
        a.call("add_peer", "B", 1, b"not metadata")
    assert err.value.kind == "IncompatiblePeer"
    assert a.call("peers") == {"B": 1}


# -- failures and restarts --------------------------------------------------------------------------
def test_a_read_from_a_stalled_peer_ends_by_its_deadline(pair):
    """SIGSTOP: the peer is alive but its CPU does nothing. The read either times out, cancelled (not
    in flight), or completes: a one-sided NIXL read copies from a stopped process through the kernel,
    and ucxx did too once in CI (its transfer had already been handed to UCX's shared-memory path).
    Either way nothing hangs, and the peer works again once it continues."""
    backend, a, _ = pair
    stalled = PeerProcess(backend, "S", seed=7, num_blocks=NUM_BLOCKS).ready()
    try:
        a.call("add_peer", "S", 1, stalled.metadata)
        a.call("read", "S", [0], [0], b"warm", 10.0)
        failures = a.call("counters")["failures"]
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            outcome = a.call("read", "S", [1, 2], [1, 2], b"stalled", 1.0) or "completed"
        except PeerError as err:
            outcome = err.kind
            assert "within 1.0s" in str(err) and "keep the blocks referenced" not in str(err)
            assert a.call("counters")["failures"] == failures + 1
        assert outcome in ("TransferTimeout", "completed")
        assert time.monotonic() - t0 < 1.0 + 1.5
        os.kill(stalled.proc.pid, signal.SIGCONT)
        a.call("read", "S", [3], [3], b"continued", 10.0)
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
        stalled.stop()


def test_a_read_from_a_killed_peer_fails_within_its_timeout(pair):
    """SIGKILL a peer we already read from and one we never reached: both fail, none hangs."""
    backend, a, _ = pair
    talked, silent = (PeerProcess(backend, name, seed=3, num_blocks=NUM_BLOCKS) for name in ("V-talked", "V-silent"))
    for victim in (talked.ready(), silent.ready()):
        a.call("add_peer", victim.name, 1, victim.metadata)
    a.call("read", talked.name, [0], [0], b"warm", 10.0)
    failures = a.call("counters")["failures"]
    talked.kill(), silent.kill()

    timeout_s = 1.5
    for victim in (talked, silent):
        for attempt in range(2):
            t0 = time.monotonic()
            with pytest.raises(PeerError) as err:
                a.call("read", victim.name, [1, 2], [1, 2], b"from-the-dead", timeout_s, timeout_s=timeout_s + 30)
            assert err.value.kind in ("TransferFailed", "TransferTimeout"), err.value
            assert time.monotonic() - t0 < timeout_s + 1.5
    assert a.call("counters")["failures"] == failures + 4
    a.call("read", "B", [3], [3], b"still-fine", 10.0)  # the transport survives dead peers


def test_a_peer_killed_mid_read_never_hangs_the_reader(pair):
    """The kill lands while the read runs (ucxx: ~0.1 s of TCP) or just after it (NIXL copies
    inside the post): either way the read ends by its deadline and the transport stays usable."""
    backend, _, b = pair
    reader = PeerProcess(backend, "M", seed=8, num_blocks=2048)
    victim = PeerProcess(backend, "V-mid", seed=6, num_blocks=2048)
    try:
        reader.ready(), victim.ready()
        reader.call("add_peer", victim.name, 1, victim.metadata)
        reader.call("add_peer", "B", 1, b.metadata)
        reader.call("read", victim.name, [0], [0], b"warm", 10.0)
        timeout_s = 2.0
        t0 = time.monotonic()
        reader.call("start", victim.name, list(range(2048)), list(range(2048)), b"mid", timeout_s)  # 96 MiB
        victim.kill()
        try:
            reader.call("finish", b"mid", timeout_s=timeout_s + 30)
            outcome = "completed before the kill"
        except PeerError as err:
            outcome = err.kind
        assert outcome in ("completed before the kill", "TransferFailed", "TransferTimeout")
        assert time.monotonic() - t0 < timeout_s + 1.5
        reader.call("read", "B", [4], [4], b"after-mid", 10.0)
    finally:
        victim.kill(), reader.stop()


def test_a_cancelled_read_leaves_the_transport_usable(pair):
    _, a, _ = pair
    for _ in range(3):
        a.call("start", "B", list(range(NUM_BLOCKS)), list(range(NUM_BLOCKS)), b"cancelled", 10.0)
        assert a.call("cancel", b"cancelled") in ("CancelledError", "NoneType")  # NoneType: it finished first
    before = a.call("digests")
    a.call("read", "B", [9], [10], b"after-cancel", 10.0)
    assert changed(before, a.call("digests")) == [10]


def test_a_new_generation_of_a_peer_replaces_the_old_one(pair):
    backend, a, _ = pair
    old = PeerProcess(backend, "R", generation=1, seed=4, num_blocks=NUM_BLOCKS)
    new = PeerProcess(backend, "R", generation=2, seed=5, num_blocks=NUM_BLOCKS)  # the restart, started early
    try:
        a.call("add_peer", "R", 1, old.ready().metadata)
        a.call("read", "R", [5], [5], b"from-gen-1", 10.0)
        old.kill()

        a.call("add_peer", "R", 2, new.ready().metadata)
        a.call("add_peer", "R", 2, new.metadata)  # same generation again: a no-op
        assert a.call("peers")["R"] == 2
        before, r_digests = a.call("digests"), new.call("digests")
        a.call("read", "R", [6, 7], [8, 9], b"from-gen-2", 10.0)
        assert new.call("wait_notif", b"from-gen-2", 10.0) == b"from-gen-2"
        after = a.call("digests")
        assert changed(before, after) == [8, 9]
        assert after[8:10] == r_digests[6:8]
    finally:
        old.kill(), new.stop()


# -- pure helpers (no backend) ----------------------------------------------------------------------
def test_coalesce_merges_only_runs_consecutive_on_both_sides():
    loc = np.array([0, 1, 2, 7, 9, 10, 11, 31])
    rem = np.array([30, 31, 5, 6, 14, 13, 12, 0])
    assert coalesce(loc, rem) == [(0, 30, 2), (2, 5, 1), (7, 6, 1), (9, 14, 1), (10, 13, 1), (11, 12, 1), (31, 0, 1)]
    assert coalesce(np.arange(4, 12), np.arange(20, 28)) == [(4, 20, 8)]


def test_pair_ids_validates_before_any_backend_sees_them():
    loc, rem = pair_ids([1, 2], [3, 4], 8, 8)
    assert loc.dtype == np.int32 and rem.tolist() == [3, 4]
    pair_ids([1, 2], [3, 3], 8, 8)  # reading one remote block into two local ones is fine
    with pytest.raises(InvalidBlocks, match="repeat"):
        pair_ids([3, 3], [1, 2], 8, 8)
    with pytest.raises(InvalidBlocks, match=r"\[0, 8\)"):
        pair_ids([1, 2], [3, 8], 8, 8)


def test_an_unknown_backend_or_a_missing_ucxx_extra_says_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="nixl, ucxx"):
        make_transport("tcp", "n", torch.zeros(2, 4), generation=1, timeout_s=1.0)
    from workers.transfer.ucxx_transport import UCX_DEFAULTS

    for key in UCX_DEFAULTS:  # the transport sets these first; keep this process's environment as it was
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setitem(sys.modules, "ucxx", None)  # as if the [ucxx] extra were not installed
    with pytest.raises(ImportError, match=r"agentkv\[ucxx\]"):
        make_transport("ucxx", "n", torch.zeros(2, 4), generation=1, timeout_s=1.0)


def test_layout_follows_the_tensor_not_the_model():
    kv = torch.zeros(10, 30, 2, 16, 3, 64)  # SmolLM2-135M fp32, block_size 16
    info = describe(kv, "nixl", "n", 3)
    assert (info.num_blocks, info.block_nbytes, info.mem_type, info.device_id) == (10, 737_280, "DRAM", 0)
    assert info.base_ptr == kv.data_ptr() and describe(kv.to(torch.bfloat16), "nixl", "n", 3).block_nbytes == 368_640
    with pytest.raises(ValueError, match="contiguous"):
        describe(kv.transpose(0, 1), "nixl", "n", 3)


def test_peer_info_roundtrips_through_msgpack():
    import msgspec

    info = PeerInfo(backend="nixl", name="n", generation=3, num_blocks=4, block_nbytes=8, base_ptr=1,
                    mem_type="DRAM", device_id=0, endpoint=b"x")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(info), type=PeerInfo) == info


def test_the_transport_is_restricted_to_the_device_of_the_advertised_host(monkeypatch):
    from workers.transfer import bind_transport_to, net_devices_for
    from workers.transfer.network import listen_device

    assert net_devices_for("127.0.0.1") == net_devices_for("localhost") != ""  # loopback: "lo" on Linux
    assert net_devices_for("0.0.0.0") == "" and net_devices_for("no-such-host.invalid") == ""
    monkeypatch.setenv("UCX_NET_DEVICES", "")  # recorded: restored after the test whatever bind_transport_to sets
    monkeypatch.delenv("UCX_NET_DEVICES")
    assert listen_device() is None  # no restriction: ucxx advertises the address of its own pick
    bind_transport_to("lo")
    assert os.environ["UCX_NET_DEVICES"] == "lo" and listen_device() == "lo"  # ucxx advertises lo's address
    bind_transport_to("eth9")  # a derived default never overrides what is set
    assert os.environ["UCX_NET_DEVICES"] == "lo"
    bind_transport_to("eth9", explicit=True)  # --transfer-devices does
    assert os.environ["UCX_NET_DEVICES"] == "eth9"


def test_a_nixl_transport_bound_to_loopback_listens_only_there():
    """Measured before the setting: NIXL's UCX listened on every device (here 127.0.0.1 and the host's address)."""
    import shutil

    if shutil.which("ss") is None:
        pytest.skip("no `ss` here")
    script = ("import os, subprocess, torch\nfrom workers.transfer import bind_transport_to, make_transport, net_devices_for\n"
              "bind_transport_to(net_devices_for('127.0.0.1'))\n"
              "t = make_transport('nixl', 'probe', torch.zeros(4, 256), generation=1, timeout_s=2)\nt.metadata()\n"
              "out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout\n"
              "print([l.split()[3] for l in out.splitlines() if f'pid={os.getpid()},' in l])\nt.close()\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).parents[1])  # fmt: skip
    listening = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert listening and all(addr.startswith("127.0.0.1:") for addr in listening), (listening, proc.stderr[-500:])
