"""Migration, offload and restore on real GPUs (issue 13). Peer-to-peer tests need two GPUs.

VRAM_RESIDENCY_REQUIRE_GPU=1 .venv/bin/python -m pytest tests/gpu/test_cuda_gpu_migrate.py -q
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.conftest import random_bytes, two_gpus
from vram_residency import VramManager
from vram_residency import _migrate as mig
from vram_residency.backends.cuda import _backend as cuda_backend
from vram_residency.errors import IntegrityViolation, NotSealed, SealVerificationFailed
from vram_residency.shard import SealedShard

pytestmark = pytest.mark.gpu

TOKEN = "gpu-migrate-token-0123456789abcdef"
MiB = 1 << 20


def flip(at: int, times: int = 1) -> Any:
    state = {"n": 0}

    def hook(target: Any, offset: int, length: int) -> None:
        if state["n"] < times and offset <= at < offset + length:
            state["n"] += 1
            if isinstance(target, memoryview):
                target[at - offset] ^= 0x40
            else:
                target.write(at, bytes([target.read(at, 1)[0] ^ 0x40]))

    return hook


@pytest.fixture
def one() -> Iterator[VramManager]:
    with VramManager(TOKEN, 0, backend="cuda") as m:
        yield m


@pytest.fixture
def pair() -> Iterator[tuple[VramManager, VramManager]]:
    with VramManager(TOKEN, 0, backend="cuda") as a, VramManager(TOKEN, 1, backend="cuda") as b:
        yield a, b


def _free(*mgrs: VramManager) -> list[int]:
    return [m.available_vram() for m in mgrs]


def _warm(a: VramManager, b: VramManager, shard: SealedShard) -> SealedShard:
    """One verified migration there and back, and a verify on each device, before any 'before'
    snapshot of free memory: the backends create their reusable device reservations (digest
    scratch sized for this shard, segment-table arenas) lazily, on first use, and keep them. Such a
    reservation made during the measured step is 2 MiB of cuMemGetInfo, not a leak; a leaked
    destination buffer of the shard's size still shows. Returns the shard, back on ``a``."""
    there = a.migrate(shard, b)
    b.verify_sealed(there)
    back = b.migrate(there, a)
    a.verify_sealed(back)
    return back


@pytest.mark.parametrize("to", ["host", "file"])
def test_offload_restore_round_trip(one: VramManager, tmp_path: Path, to: str) -> None:
    payload = random_bytes(200 * MiB + 77, seed=1)
    s = one.seal_model(payload)
    one.offload(s, to, tmp_path / "s.bin" if to == "file" else None)  # type: ignore[arg-type]
    with pytest.raises(NotSealed):
        one.verify_sealed(s)
    assert one.restore(s) == 0
    one.verify_sealed(s)
    assert one._entry(s).buf.read(150 * MiB, 4096) == payload[150 * MiB : 150 * MiB + 4096]


def test_offload_after_restore_reuses_the_zeroed_pinned_copy(one: VramManager) -> None:
    """The second offload takes the first one's pinned buffer from the pool (waiting for its
    background zeroing if needed) instead of page-locking new memory; a different shard's bytes
    replace it whole, and both round trips verify."""
    a = one.seal_model(random_bytes(96 * MiB + 5, seed=7))
    b = one.seal_model(random_bytes(96 * MiB + 5, seed=8))
    one.offload(a)
    first = mig._OFFLOADED[one.store][a.shard_id].copy.memory
    assert isinstance(first, cuda_backend.PinnedHostMemory)
    address = first.address
    assert one.restore(a) == 0
    one.offload(b)
    second = mig._OFFLOADED[one.store][b.shard_id].copy.memory
    assert isinstance(second, cuda_backend.PinnedHostMemory)
    assert second.address == address  # reused, not a new cuMemAllocHost
    assert one.restore(b) == 0
    one.verify_sealed(a)
    one.verify_sealed(b)
    mig._wait_discards(one.store)
    pool = one._backend._host_pool  # type: ignore[attr-defined]
    assert pool.pooled_bytes >= 96 * MiB + 5
    buf = pool.take(96 * MiB + 5)
    try:
        assert not buf.array[: 96 * MiB + 5].any()  # zeroed before it went back
    finally:
        pool.give(buf)


def test_restore_rewrites_unit_that_landed_wrong(one: VramManager) -> None:
    s = one.seal_model(random_bytes(80 * MiB, seed=2))
    one.offload(s)
    assert mig.restore(one.store, s, on_landed=flip(70 * MiB + 3)) == 1
    one.verify_sealed(s)


def test_damaged_pinned_copy_is_refused(one: VramManager) -> None:
    s = one.seal_model(random_bytes(8 * MiB, seed=3))
    one.offload(s)
    rec = mig._OFFLOADED[one.store][s.shard_id]
    assert rec.copy.memory is not None
    rec.copy.memory.view[5 * MiB] ^= 1
    with pytest.raises(SealVerificationFailed):
        mig.restore(one.store, s, on_landed=flip(5 * MiB + 1))
    assert one.offloaded_shards() == [s]


@two_gpus
def test_p2p_migration(pair: tuple[VramManager, VramManager]) -> None:
    a, b = pair
    payload = random_bytes(300 * MiB + 5, seed=4)
    old = a.seal_model(payload)
    fa, fb = _free(a, b)
    new = a.migrate(old, b)
    assert new.gpu_device == 1
    b.verify_sealed(new)
    assert b._entry(new).buf.read(299 * MiB, 4096) == payload[299 * MiB : 299 * MiB + 4096]
    with pytest.raises(NotSealed):
        a.verify_sealed(old)
    # cuMemGetInfo moves in 2 MiB pages: the source's pages came back, the destination's went.
    na, nb = _free(a, b)
    assert na - fa >= 298 * MiB and fb - nb >= 298 * MiB


@two_gpus
@pytest.mark.parametrize("peer", [True, False], ids=["p2p", "staged"])
def test_in_flight_corruption(
    pair: tuple[VramManager, VramManager], monkeypatch: pytest.MonkeyPatch, peer: bool
) -> None:
    a, b = pair
    if not peer:
        monkeypatch.setattr(cuda_backend, "_peer_can_access_peer", lambda self, other: False)
    old = _warm(a, b, a.seal_model(random_bytes(130 * MiB, seed=5)))
    before = _free(a, b)
    with pytest.raises(IntegrityViolation):
        mig.migrate(a.store, old, b.store, on_landed=flip(129 * MiB + 9, times=10), max_retries=2)
    a.verify_sealed(old)
    assert _free(a, b) == before and b.shards() == []
    new = mig.migrate(a.store, old, b.store, on_landed=flip(65 * MiB))
    b.verify_sealed(new)


@two_gpus
def test_destination_full_leaves_source(pair: tuple[VramManager, VramManager]) -> None:
    from vram_residency.errors import InsufficientVram

    a, b = pair
    old = _warm(a, b, a.seal_model(random_bytes(64 * MiB, seed=6)))
    bk = b._backend
    hog = bk.allocate(max(1, bk.mem_info()[0] - 32 * MiB))
    try:
        before = _free(a, b)
        with pytest.raises(InsufficientVram):
            a.migrate(old, b)
        a.verify_sealed(old)
        assert _free(a, b) == before
    finally:
        hog.close()
