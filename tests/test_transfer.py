"""Block transfer between two real processes, for both backends (NIXL and ucxx).

Each peer is a separate OS process (tests/transfer_peer.py) with its own pool whose blocks carry
a pattern unique to (process seed, block id), so "exactly these blocks changed, to exactly those
bytes" is checked by comparing per-block digests before and after.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from workers.transfer.base import (
    InvalidBlocks,
    PeerInfo,
    PoolLayout,
    coalesce,
    pair_ids,
)
from tests.transfer_peer import BLOCK_SHAPE, PeerError, PeerProcess

BACKENDS = ("nixl", "ucxx")
BLOCK_NBYTES = int(np.prod(BLOCK_SHAPE)) * 4
NUM_BLOCKS = 32

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request):
    """Processes A (initiator, seed 1) and B (target, seed 2); A has loaded B."""
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
def test_write_changes_exactly_the_target_blocks_and_counts_their_bytes(pair):
    _, a, b = pair
    src, dst = list(range(4, 12)), list(range(20, 28))  # blocks k..n of A into other ids of B
    a_digests, b_before = a.call("digests"), b.call("digests")
    a_count, b_count = a.call("counters"), b.call("counters")

    a.call("write", "B", src, dst, b"w-1", 10.0)
    peer, notif, op, blocks, nbytes = b.call("wait_notif", b"w-1", 10.0)

    b_after = b.call("digests")
    assert changed(b_before, b_after) == dst
    assert [b_after[d] for d in dst] == [a_digests[s] for s in src]
    assert (peer, notif, op, blocks, nbytes) == ("A", b"w-1", "write", 8, 8 * BLOCK_NBYTES)
    assert delta(a.call("counters"), a_count) == {
        "bytes_sent": 8 * BLOCK_NBYTES, "blocks_sent": 8, "bytes_received": 0, "blocks_received": 0,
        "transfers": 1, "failures": 0}
    assert delta(b.call("counters"), b_count) == {
        "bytes_sent": 0, "blocks_sent": 0, "bytes_received": 8 * BLOCK_NBYTES, "blocks_received": 8,
        "transfers": 0, "failures": 0}


def test_read_pulls_exactly_the_named_blocks_and_tells_the_source(pair):
    _, a, b = pair
    remote, local = list(range(0, 5)), list(range(27, 32))
    a_before, b_digests = a.call("digests"), b.call("digests")
    b_count = b.call("counters")

    a.call("read", "B", remote, local, b"r-1", 10.0)

    a_after = a.call("digests")
    assert changed(a_before, a_after) == local
    assert [a_after[x] for x in local] == [b_digests[y] for y in remote]
    assert b.call("wait_notif", b"r-1", 10.0)[2:] == ("read", 5, 5 * BLOCK_NBYTES)
    assert b.call("digests") == b_digests  # reading never modifies the source
    assert delta(b.call("counters"), b_count)["bytes_sent"] == 5 * BLOCK_NBYTES


def test_scattered_block_ids_pair_up_one_to_one(pair):
    """Runs, singletons and a descending sequence: coalescing must not reorder or merge wrongly."""
    _, a, b = pair
    src = [0, 1, 2, 7, 9, 10, 11, 31]
    dst = [30, 31, 5, 6, 14, 13, 12, 0]
    a_digests, b_before = a.call("digests"), b.call("digests")

    a.call("write", "B", src, dst, b"w-scatter", 10.0)
    b.call("wait_notif", b"w-scatter", 10.0)

    b_after = b.call("digests")
    assert changed(b_before, b_after) == sorted(dst)
    assert [b_after[d] for d in dst] == [a_digests[s] for s in src]


def test_notification_that_never_comes_times_out(pair):
    _, _, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerError) as err:
        b.call("wait_notif", b"never-sent", 0.5)
    assert err.value.kind == "TransferTimeout"
    assert time.monotonic() - t0 < 5


def test_out_of_range_and_mismatched_ids_are_refused_before_sending(pair):
    _, a, _ = pair
    for src, dst in (([0, 1], [0]), ([0], [NUM_BLOCKS]), ([0, 1], [3, 3]), ([], [])):
        with pytest.raises(PeerError) as err:
            a.call("write", "B", src, dst, b"bad", 5.0)
        assert err.value.kind == "InvalidBlocks"


def test_metadata_for_another_node_or_generation_is_rejected(pair):
    _, a, b = pair
    with pytest.raises(PeerError) as err:
        a.call("add_peer", "C", 1, b.metadata)  # registry says C, metadata says B
    assert err.value.kind == "IncompatiblePeer"
    with pytest.raises(PeerError) as err:
        a.call("add_peer", "B", 7, b.metadata)
    assert err.value.kind == "IncompatiblePeer"
    assert a.call("peers") == {"B": 1}


# -- failures and restarts --------------------------------------------------------------------------
def test_transfer_to_a_killed_peer_fails_within_its_timeout(pair):
    """SIGKILL a peer we already talked to and one we never reached: both ops fail, none hangs."""
    backend, a, _ = pair
    talked, silent = (PeerProcess(backend, name, seed=3, num_blocks=NUM_BLOCKS) for name in ("V-talked", "V-silent"))
    for victim in (talked.ready(), silent.ready()):
        a.call("add_peer", victim.name, 1, victim.metadata)
    a.call("write", talked.name, [0], [0], b"warm", 10.0)
    failures = a.call("counters")["failures"]
    talked.kill(), silent.kill()

    timeout_s = 1.5
    for victim in (talked, silent):
        for op in ("write", "read"):
            t0 = time.monotonic()
            with pytest.raises(PeerError) as err:
                a.call(op, victim.name, [1, 2], [1, 2], b"to-the-dead", timeout_s, timeout_s=timeout_s + 30)
            assert err.value.kind in ("TransferFailed", "TransferTimeout"), err.value
            assert time.monotonic() - t0 < timeout_s + 1.5
    assert a.call("counters")["failures"] == failures + 4
    a.call("write", "B", [3], [3], b"still-fine", 10.0)  # the transport survives dead peers


def test_a_peer_killed_mid_transfer_never_hangs_the_initiator(pair):
    """The kill lands while the request runs (ucxx: ~0.1 s of TCP) or just after it (NIXL copies
    inside the post): either way the request ends by its deadline and the transport stays usable."""
    backend, a, _ = pair
    victim = PeerProcess(backend, "V-mid", seed=6, num_blocks=2048).ready()
    a.call("add_peer", victim.name, 1, victim.metadata)
    a.call("write", victim.name, [0], [0], b"warm", 10.0)
    src = [i % NUM_BLOCKS for i in range(2048)]  # 96 MiB: A's 32 blocks, over and over
    timeout_s = 2.0
    t0 = time.monotonic()
    a.call("start", "write", victim.name, src, list(range(2048)), b"mid", timeout_s)
    victim.kill()
    try:
        a.call("finish", b"mid", timeout_s=timeout_s + 30)
        outcome = "completed before the kill"
    except PeerError as err:
        outcome = err.kind
    assert outcome in ("completed before the kill", "TransferFailed", "TransferTimeout")
    assert time.monotonic() - t0 < timeout_s + 1.5
    a.call("write", "B", [4], [4], b"after-mid", 10.0)


def test_a_new_generation_of_a_peer_replaces_the_old_one(pair):
    backend, a, _ = pair
    old = PeerProcess(backend, "R", generation=1, seed=4, num_blocks=NUM_BLOCKS)
    new = PeerProcess(backend, "R", generation=2, seed=5, num_blocks=NUM_BLOCKS)  # the restart, started early
    try:
        a.call("add_peer", "R", 1, old.ready().metadata)
        a.call("write", "R", [5], [5], b"to-gen-1", 10.0)
        old.kill()

        a.call("add_peer", "R", 2, new.ready().metadata)
        a.call("add_peer", "R", 2, new.metadata)  # same generation again: a no-op
        assert a.call("peers")["R"] == 2
        a_digests, before = a.call("digests"), new.call("digests")
        a.call("write", "R", [6, 7], [8, 9], b"to-gen-2", 10.0)
        assert new.call("wait_notif", b"to-gen-2", 10.0)[:3] == ("A", b"to-gen-2", "write")
        after = new.call("digests")
        assert changed(before, after) == [8, 9]
        assert after[8:10] == a_digests[6:8]
    finally:
        old.kill(), new.stop()


# -- pure helpers (no backend) ----------------------------------------------------------------------
def test_coalesce_merges_only_runs_consecutive_on_both_sides():
    loc = np.array([0, 1, 2, 7, 9, 10, 11, 31])
    rem = np.array([30, 31, 5, 6, 14, 13, 12, 0])
    assert coalesce(loc, rem) == [(0, 30, 2), (2, 5, 1), (7, 6, 1), (9, 14, 1), (10, 13, 1), (11, 12, 1), (31, 0, 1)]
    assert coalesce(np.arange(4, 12), np.arange(20, 28)) == [(4, 20, 8)]


def test_pair_ids_validates_before_any_backend_sees_them():
    loc, rem = pair_ids([1, 2], [3, 4], 8, 8, "remote")
    assert loc.dtype == np.int32 and rem.tolist() == [3, 4]
    pair_ids([1, 1], [3, 4], 8, 8, "remote")  # reading one source block twice is fine
    with pytest.raises(InvalidBlocks, match="repeat"):
        pair_ids([1, 2], [3, 3], 8, 8, "remote")
    with pytest.raises(InvalidBlocks, match=r"\[0, 8\)"):
        pair_ids([1, 2], [3, 8], 8, 8, "remote")


def test_layout_follows_the_tensor_not_the_model():
    kv = torch.zeros(10, 30, 2, 16, 3, 64)  # SmolLM2-135M fp32, block_size 16
    lay = PoolLayout.of(kv)
    assert (lay.num_blocks, lay.block_nbytes, lay.mem_type, lay.device_id) == (10, 737_280, "DRAM", 0)
    assert lay.base_ptr == kv.data_ptr() and PoolLayout.of(kv.to(torch.bfloat16)).block_nbytes == 368_640
    with pytest.raises(ValueError, match="contiguous"):
        PoolLayout.of(kv.transpose(0, 1))


def test_peer_info_roundtrips_through_msgpack():
    import msgspec

    info = PeerInfo(backend="nixl", name="n", generation=3, num_blocks=4, block_nbytes=8, base_ptr=1,
                    mem_type="DRAM", device_id=0, endpoint=b"x")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(info), type=PeerInfo) == info
