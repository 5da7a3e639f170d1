"""Migration, offload and restore on the host backend with two emulated devices in one process.

Each failure test checks the invariant of issue 13: the original shard is still sealed, resident
and verifiable, and both devices' free memory is back to what it was before the attempt.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import VramManager
from vram_residency import _migrate as mig
from vram_residency.backends.base import COPY_CHUNK, DeviceBuffer, HostMemory
from vram_residency.devices import DeviceGroup
from vram_residency.errors import (
    ConfigError,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    SealVerificationFailed,
)
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE
from vram_residency.shard import check_seal_record

TOKEN = "migration-test-token-0123456789abcdef"
MiB = 1 << 20


class Sink:
    """An in-memory audit log that can be told to fail on one event type (a full disk, say)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail_on: str | None = None

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        if event_type == self.fail_on:
            raise OSError(28, "No space left on device (injected)")
        self.events.append((event_type, fields))

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event_type]


def data(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def pair(sink: Sink) -> Iterator[tuple[VramManager, VramManager]]:
    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=64 * MiB, audit=sink, worker_id="w")
    b = VramManager(TOKEN, 1, backend="host", capacity_bytes=64 * MiB, audit=sink, worker_id="w")
    yield a, b
    a.close()
    b.close()


def free(*mgrs: VramManager) -> list[int]:
    return [m.available_vram() for m in mgrs]


def flip(at: int) -> Any:
    """A landed-hook that flips one byte at absolute offset ``at`` once (a transient fault)."""
    state = {"done": False}

    def hook(target: DeviceBuffer | memoryview, offset: int, length: int) -> None:
        if state["done"] or not offset <= at < offset + length:
            return
        state["done"] = True
        if isinstance(target, memoryview):
            target[at - offset] ^= 0xFF
        else:
            target.write(at, bytes([target.read(at, 1)[0] ^ 0xFF]))

    return hook


def always_flip(at: int) -> Any:
    def hook(target: DeviceBuffer | memoryview, offset: int, length: int) -> None:
        if offset <= at < offset + length:
            if isinstance(target, memoryview):
                target[at - offset] ^= 0xFF
            else:
                target.write(at, bytes([target.read(at, 1)[0] ^ 0xFF]))

    return hook


# -- migration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [SHA256_TREE_V1, BLAKE3])
def test_migrate_moves_and_reseals(pair: tuple[VramManager, VramManager], sink: Sink, algorithm: str) -> None:
    a, b = pair
    payload = data(3 * MiB + 123)
    old = a.seal_model(payload, model_ref="m", shard_index=0, total_shards=1, digest_algorithm=algorithm)
    before_a, before_b = free(a, b)
    new = a.migrate(old, b)
    assert new.gpu_device == 1 and new.shard_id != old.shard_id
    assert (new.digest, new.vram_bytes, new.model_ref) == (old.digest, old.vram_bytes, "m")
    b.verify_sealed(new)
    assert check_seal_record(new.record(), TOKEN) == new
    with pytest.raises(NotSealed):
        a.verify_sealed(old)
    # The source allocation is gone, the destination holds exactly the shard (256-byte rounding).
    rounded = -(-len(payload) // 256) * 256
    assert free(a, b) == [before_a + rounded, before_b - rounded]
    (ev,) = sink.of("ShardMigrated")
    assert ev["from_shard_id"] == old.shard_id and ev["shard_id"] == new.shard_id
    assert (ev["from_device"], ev["to_device"], ev["vram_bytes"]) == (0, 1, len(payload))
    assert ev["retried_units"] == 0 and ev["duration_ns"] > 0


def test_migrate_back_and_forth_keeps_bytes(pair: tuple[VramManager, VramManager]) -> None:
    a, b = pair
    payload = data(2 * MiB, seed=7)
    s = a.seal_model(payload)
    s = a.migrate(s, b)
    s = b.migrate(s, a)
    a.verify_sealed(s)
    assert a._entry(s).buf.read(0, len(payload)) == payload


def test_in_flight_corruption_is_recopied(pair: tuple[VramManager, VramManager], sink: Sink) -> None:
    a, b = pair
    payload = data(3 * MiB)
    old = a.seal_model(payload)
    new = mig.migrate(a.store, old, b.store, on_landed=flip(MiB + 5))
    b.verify_sealed(new)
    assert sink.of("ShardMigrated")[0]["retried_units"] == 1
    assert b._entry(new).buf.read(0, len(payload)) == payload


def test_persistent_corruption_keeps_source(pair: tuple[VramManager, VramManager], sink: Sink) -> None:
    a, b = pair
    old = a.seal_model(data(2 * MiB))
    before = free(a, b)
    with pytest.raises(IntegrityViolation, match="still arrived wrong"):
        mig.migrate(a.store, old, b.store, on_landed=always_flip(17), max_retries=2)
    a.verify_sealed(old)
    assert free(a, b) == before
    assert b.shards() == [] and sink.of("ShardMigrated") == []


def test_damaged_source_is_reported_and_kept(pair: tuple[VramManager, VramManager]) -> None:
    a, b = pair
    old = a.seal_model(data(2 * MiB))
    a._entry(old).buf.write(MiB, b"\x00\x01")  # the source memory itself changed after sealing
    before = free(a, b)
    with pytest.raises(SealVerificationFailed) as info:
        a.migrate(old, b, max_retries=1)
    assert info.value.corrupted_ranges == [(MiB, 2 * MiB)]
    assert free(a, b) == before and b.shards() == []
    assert [s.shard_id for s in a.shards()] == [old.shard_id]


def test_destination_out_of_memory(sink: Sink) -> None:
    with (
        VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB, audit=sink) as a,
        VramManager(TOKEN, 1, backend="host", capacity_bytes=2 * MiB, audit=sink) as b,
    ):
        old = a.seal_model(data(3 * MiB))
        before = free(a, b)
        with pytest.raises(InsufficientVram):
            a.migrate(old, b)
        a.verify_sealed(old)
        assert free(a, b) == before


@pytest.mark.parametrize("event", ["VramAllocated", "VramSealed", "ShardMigrated"])
def test_audit_failure_at_every_step_leaks_nothing(
    pair: tuple[VramManager, VramManager], sink: Sink, event: str
) -> None:
    a, b = pair
    old = a.seal_model(data(2 * MiB + 1))
    before = free(a, b)
    sink.fail_on = event
    with pytest.raises(OSError, match="injected"):
        a.migrate(old, b)
    sink.fail_on = None
    a.verify_sealed(old)
    assert free(a, b) == before and b.shards() == []


def test_failure_in_copy_and_hash_leaks_nothing(
    pair: tuple[VramManager, VramManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    old = a.seal_model(data(2 * MiB))
    before = free(a, b)

    def broken_hook(target: DeviceBuffer | memoryview, offset: int, length: int) -> None:
        raise IntegrityViolation("copy engine fault (injected)")

    with pytest.raises(IntegrityViolation, match="injected"):
        mig.migrate(a.store, old, b.store, on_landed=broken_hook)
    assert free(a, b) == before

    def broken_hash(*args: Any, **kwargs: Any) -> Any:
        raise IntegrityViolation("digest kernel fault (injected)")

    monkeypatch.setattr(b._backend, "hash", broken_hash)
    with pytest.raises(IntegrityViolation, match="digest kernel"):
        a.migrate(old, b)
    monkeypatch.undo()
    a.verify_sealed(old)
    assert free(a, b) == before and b.shards() == []


def test_migrate_refuses_bad_peers(pair: tuple[VramManager, VramManager]) -> None:
    a, _ = pair
    s = a.seal_model(data(1000))
    with VramManager("another-token-0123456789abcdefghij", 1, backend="host") as other:
        with pytest.raises(ConfigError, match="worker token"):
            a.migrate(s, other)
    with VramManager(TOKEN, 0, backend="host") as same_device:
        with pytest.raises(InvalidInput, match="same device"):
            a.migrate(s, same_device)
    with pytest.raises(InvalidInput):
        a.migrate(s, a)
    with pytest.raises(InvalidInput):
        a.migrate(s, "device 1")  # type: ignore[arg-type]
    a.verify_sealed(s)


def test_forged_seal_is_not_migrated(pair: tuple[VramManager, VramManager]) -> None:
    import dataclasses

    a, b = pair
    s = a.seal_model(data(1000))
    forged = dataclasses.replace(s, model_ref="someone-else")
    with pytest.raises(SealVerificationFailed):
        a.migrate(forged, b)
    a.verify_sealed(s)


def test_device_group_by_id(sink: Sink) -> None:
    with DeviceGroup(TOKEN, [0, 1], backend="host", capacity_bytes=16 * MiB, audit=sink) as g:
        s = g.manager(0).seal_model(data(MiB + 1))
        t = g.migrate(s, 1)
        g.manager(1).verify_sealed(t)
        assert g.owner(t.shard_id) is g.manager(1) and g.owner(s.shard_id) is None
        with pytest.raises(InvalidInput, match="unknown device 7"):
            g.migrate(t, 7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(1, 3 * MiB + 7),
    where=st.floats(0, 1, exclude_max=True),
    transient=st.booleans(),
)
def test_any_single_fault_is_caught(size: int, where: float, transient: bool) -> None:
    """Property: wherever a byte is flipped in flight, the result is either a verified shard with
    the original bytes, or an error with the source intact; never a wrong seal, never a leak."""
    with (
        VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB) as a,
        VramManager(TOKEN, 1, backend="host", capacity_bytes=8 * MiB) as b,
    ):
        payload = data(size, seed=size)
        old = a.seal_model(payload)
        before = free(a, b)
        at = int(where * size)
        try:
            hook = flip(at) if transient else always_flip(at)
            new = mig.migrate(a.store, old, b.store, on_landed=hook, max_retries=1)
        except IntegrityViolation:
            assert not transient
            a.verify_sealed(old)
            assert free(a, b) == before
        else:
            assert transient
            b.verify_sealed(new)
            assert b._entry(new).buf.read(0, size) == payload


# -- offload and restore --------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["host", "file"])
def test_offload_and_restore(
    pair: tuple[VramManager, VramManager], sink: Sink, tmp_path: Path, to: str
) -> None:
    a, _ = pair
    payload = data(3 * MiB + 5)
    s = a.seal_model(payload, model_ref="m")
    before = a.available_vram()
    path = tmp_path / "shard.bin" if to == "file" else None
    a.offload(s, to, path)  # type: ignore[arg-type]
    assert a.available_vram() == before + -(-len(payload) // 256) * 256
    assert a.offloaded_shards() == [s] and a.shards() == []
    with pytest.raises(NotSealed):
        a.verify_sealed(s)
    if path is not None:
        assert path.read_bytes() == payload and (path.stat().st_mode & 0o777) == 0o600
    assert a.restore(s) == 0
    a.verify_sealed(s)  # the original seal: same shard id, same tag
    assert a._entry(s).buf.read(0, len(payload)) == payload
    assert a.available_vram() == before and a.offloaded_shards() == []
    if path is not None:
        assert not path.exists()
    assert [e["to"] for e in sink.of("ShardOffloaded")] == [to]
    assert sink.of("ShardRestored")[0]["repaired_units"] == 0


def test_restore_repairs_units_that_land_wrong(pair: tuple[VramManager, VramManager], sink: Sink) -> None:
    a, _ = pair
    s = a.seal_model(data(4 * MiB))
    a.offload(s)
    assert mig.restore(a.store, s, on_landed=flip(2 * MiB + 9)) == 1
    a.verify_sealed(s)
    assert sink.of("ShardRestored")[0]["repaired_units"] == 1


def test_damaged_offload_file_is_never_trusted(pair: tuple[VramManager, VramManager], tmp_path: Path) -> None:
    a, _ = pair
    s = a.seal_model(data(3 * MiB))
    path = tmp_path / "shard.bin"
    a.offload(s, "file", path)
    with open(path, "r+b") as f:  # the disk copy rots while offloaded
        f.seek(MiB + 100)
        f.write(b"\xee")
    before = a.available_vram()
    with pytest.raises(SealVerificationFailed) as info:
        a.restore(s)
    assert info.value.corrupted_ranges == [(MiB, 2 * MiB)]
    assert a.available_vram() == before and a.offloaded_shards() == [s]
    with open(path, "r+b") as f:  # put the byte back: the copy is good again
        f.seek(MiB + 100)
        f.write(data(3 * MiB)[MiB + 100 : MiB + 101])
    a.restore(s)
    a.verify_sealed(s)


def test_offload_catches_corruption_in_flight(pair: tuple[VramManager, VramManager], tmp_path: Path) -> None:
    a, _ = pair
    s = a.seal_model(data(2 * MiB))
    mig.offload(a.store, s, "file", tmp_path / "x", on_landed=flip(5))  # re-read once, then good
    a.restore(s)
    a.verify_sealed(s)
    before = a.available_vram()
    with pytest.raises(IntegrityViolation):
        mig.offload(a.store, s, "host", on_landed=always_flip(5), max_retries=1)
    a.verify_sealed(s)  # still resident
    assert a.available_vram() == before and a.offloaded_shards() == []


@pytest.mark.parametrize("event", ["ShardOffloaded", "VramAllocated", "ShardRestored"])
def test_offload_restore_audit_failures_leak_nothing(
    pair: tuple[VramManager, VramManager], sink: Sink, tmp_path: Path, event: str
) -> None:
    a, _ = pair
    s = a.seal_model(data(2 * MiB))
    resident = a.available_vram()
    path = tmp_path / "s.bin"
    if event == "ShardOffloaded":
        sink.fail_on = event
        with pytest.raises(OSError, match="injected"):
            a.offload(s, "file", path)
        a.verify_sealed(s)
        assert not path.exists() and a.available_vram() == resident and a.offloaded_shards() == []
        return
    a.offload(s, "file", path)
    offloaded = a.available_vram()
    sink.fail_on = event
    with pytest.raises(OSError, match="injected"):
        a.restore(s)
    sink.fail_on = None
    assert a.available_vram() == offloaded and a.offloaded_shards() == [s] and path.exists()
    a.restore(s)
    a.verify_sealed(s)


def test_offload_argument_errors(pair: tuple[VramManager, VramManager], tmp_path: Path) -> None:
    a, _ = pair
    s = a.seal_model(data(1000))
    existing = tmp_path / "exists"
    existing.write_bytes(b"keep me")
    with pytest.raises(InvalidInput, match="exists already"):
        a.offload(s, "file", existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InvalidInput):
        a.offload(s, "disk")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        a.offload(s, "file")
    with pytest.raises(NotSealed):
        a.restore(s)  # resident, not offloaded
    a.verify_sealed(s)


def test_close_discards_offloaded_files(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB) as a:
        s = a.seal_model(data(MiB))
        a.offload(s, "file", path)
        assert path.exists()
    assert not path.exists()


@pytest.mark.parametrize("to", ["file", "host"])
def test_close_racing_an_offload_leaves_no_copy_behind(tmp_path: Path, to: str) -> None:
    """The manager closes while an offload is copying the shard out: close discarded the
    offloaded copies first, then waited for the shard's lock, and the offload, done copying,
    filed its copy in a fresh table no close would ever look at again (a file of the model's
    bytes left on disk; host memory, pinned on CUDA, kept past the backend's context). Every
    copy is gone once close returns, whichever of the two finished first."""
    path = tmp_path / "s.bin"
    copying, go = threading.Event(), threading.Event()

    def held(_where: Any, _offset: int, _length: int) -> None:
        copying.set()
        assert go.wait(10)

    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB)
    s = a.seal_model(data(MiB))
    outcome: list[BaseException | None] = []

    def offload() -> None:
        try:
            mig.offload(a.store, s, to, path if to == "file" else None, on_landed=held)  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=offload)
    t.start()
    assert copying.wait(10)
    closer = threading.Thread(target=a.close)
    closer.start()
    time.sleep(0.2)  # close is under way: it has discarded what it found and waits
    go.set()
    t.join(10)
    closer.join(10)
    assert not t.is_alive() and not closer.is_alive()
    assert outcome == [None] or isinstance(outcome[0], NotSealed), outcome
    assert not path.exists()
    assert not mig._OFFLOADED.get(a.store), "an offloaded copy outlived its manager"
    assert a._backend.mem_info()[0] == 8 * MiB


@pytest.mark.parametrize("swap", ["symlink", "fifo", "other file"])
def test_an_offload_file_replaced_on_disk_is_never_written_through(tmp_path: Path, swap: str) -> None:
    """The offload file is replaced while the shard is offloaded (a symlink to someone's file,
    a FIFO, another file at its name). The path was reopened by name: close() zeroed the
    symlink's target (the victim's file lost its first bytes), and a restore or a close with a
    FIFO there blocked forever. The file is now read and zeroed through the descriptor it was
    created with: the restore reads the copy it wrote, and whatever is at the path is left
    alone."""
    path = tmp_path / "s.bin"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious" * 1000)
    payload = data(MiB)
    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB)
    try:
        for restore_first in (True, False):
            s = a.seal_model(payload)
            a.offload(s, "file", path)
            path.unlink()
            if swap == "symlink":
                path.symlink_to(victim)
            elif swap == "fifo":
                os.mkfifo(path)
            else:
                path.write_bytes(data(MiB, seed=9))
            if not restore_first:
                break  # close() discards it
            t = threading.Thread(target=a.restore, args=(s,), daemon=True)
            t.start()
            t.join(10)
            assert not t.is_alive(), "restore blocked on what replaced the offload file"
            assert a.device_buffer(s).read(0, len(payload)) == payload
            a.verify_sealed(s)
            assert victim.read_bytes() == b"precious" * 1000
            path.unlink()
    finally:
        closer = threading.Thread(target=a.close, daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close blocked on what replaced the offload file"
    assert victim.read_bytes() == b"precious" * 1000
    assert path.is_symlink() or path.exists()  # not ours: left where it is
    if swap == "other file":
        assert path.read_bytes() == data(MiB, seed=9)


def test_large_shard_spans_chunks(tmp_path: Path) -> None:
    n = COPY_CHUNK + 3 * UNIT_SIZE + 11
    with (
        VramManager(TOKEN, 0, backend="host", capacity_bytes=2 * n) as a,
        VramManager(TOKEN, 1, backend="host", capacity_bytes=2 * n) as b,
    ):
        s = a.seal_model(os.urandom(n))
        t = mig.migrate(a.store, s, b.store, on_landed=flip(COPY_CHUNK + UNIT_SIZE + 1))
        b.offload(t, "file", tmp_path / "big")
        b.restore(t)
        b.verify_sealed(t)


def test_host_offload_over_chunks_hashes_each_landed_chunk() -> None:
    """The host offload lands every chunk (read_chunks), hashes it as it lands, and re-reads only
    the unit that landed wrong, in any chunk; the restored shard's host copy is zeroed and
    released in the background, and the manager's close waits for that."""
    n = 2 * COPY_CHUNK + 5 * UNIT_SIZE + 3
    payload = os.urandom(n)
    chunks: list[tuple[int, int]] = []
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=2 * n) as a:
        backend = a.store.backend
        real = backend.read_chunks

        def spy(buf: DeviceBuffer, out: memoryview, on_chunk: Any = None) -> None:
            def seen(off: int, m: int) -> None:
                chunks.append((off, m))
                if on_chunk is not None:
                    on_chunk(off, m)

            real(buf, out, seen)

        backend.read_chunks = spy  # type: ignore[method-assign]
        s = a.seal_model(payload)
        mig.offload(a.store, s, "host", on_landed=flip(COPY_CHUNK + 2 * UNIT_SIZE + 7))
        assert chunks == [(0, COPY_CHUNK), (COPY_CHUNK, COPY_CHUNK), (2 * COPY_CHUNK, 5 * UNIT_SIZE + 3)]
        rec = mig._OFFLOADED[a.store][s.shard_id]
        assert bytes(rec.copy.memory.view[:n]) == payload  # type: ignore[union-attr]
        assert a.restore(s) == 0
        a.verify_sealed(s)
        assert a._entry(s).buf.read(0, n) == payload
        copy = rec.copy
    assert copy.memory is None  # discarded (zeroed, released) by the time close returned


class _Discard(HostMemory):
    """Host memory as a backend hands it out (the manager's own PlainHostMemory inside), whose
    release first waits ``delay_s`` and then fails when ``fail`` (zeroing or unpinning that
    raised on the discard thread)."""

    def __init__(self, inner: HostMemory, *, delay_s: float = 0.0, fail: bool = False) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.fail = fail
        self.closed = False

    @property
    def view(self) -> memoryview:
        return self.inner.view

    def close(self) -> None:
        time.sleep(self.delay_s)
        if self.fail:
            raise OSError("zeroing the host copy failed (injected)")
        self.inner.close()
        self.closed = True


def _offload_with(a: VramManager, payload: bytes, **kw: Any) -> tuple[Any, _Discard]:
    s = a.seal_model(payload)
    a.offload(s, "host")
    rec = mig._OFFLOADED[a.store][s.shard_id]
    assert rec.copy.memory is not None
    mem = _Discard(rec.copy.memory, **kw)
    rec.copy.memory = mem
    return s, mem


def test_close_waits_for_every_discard_even_after_one_failed() -> None:
    """A background discard that fails must not let the manager's close return (and the backend
    go) while later discards are still zeroing; the failure is still reported."""
    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB)
    s1, _failing = _offload_with(a, data(MiB, 1), delay_s=0.1, fail=True)
    s2, slow = _offload_with(a, data(MiB, 2), delay_s=0.5)
    a.restore(s1)
    a.restore(s2)
    with pytest.raises(OSError, match="injected"):
        a.close()
    assert slow.closed  # waited for, although the discard before it failed


def test_a_failed_discard_is_reported_at_close_though_later_restores_ran() -> None:
    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB)
    s1, _failing = _offload_with(a, data(MiB, 1), fail=True)
    a.restore(s1)
    deadline = time.monotonic() + 10
    while not all(f.done() for f in mig._PENDING.get(a.store, [])) and time.monotonic() < deadline:
        time.sleep(0.01)
    s2 = a.seal_model(data(MiB, 2))
    a.offload(s2, "host")
    a.restore(s2)  # its discard is queued after the failed one finished
    with pytest.raises(OSError, match="injected"):
        a.close()


def test_restore_discards_at_once_when_the_discard_thread_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """At interpreter shutdown the discard thread takes no more work: the restored shard's host
    copy is then zeroed and released on the restoring thread, not left behind (nor the restore,
    which succeeded, reported as failed)."""
    from concurrent.futures import ThreadPoolExecutor

    gone = ThreadPoolExecutor(max_workers=1)
    gone.shutdown()
    monkeypatch.setattr(mig, "_DISCARDER", gone)
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB) as a:
        s, mem = _offload_with(a, data(MiB))
        assert a.restore(s) == 0
        a.verify_sealed(s)
        assert mem.closed


def test_close_racing_a_restore_still_waits_for_its_discard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager closes while a restore, done with the device, is about to hand its host copy
    to the discard thread (the restoring thread descheduled just then): close must not return,
    and the backend go, before that copy is zeroed and released."""
    real = mig._discard_soon
    handing = threading.Event()

    def descheduled(mgr: Any, copy: Any) -> None:
        handing.set()
        time.sleep(0.3)
        real(mgr, copy)

    monkeypatch.setattr(mig, "_discard_soon", descheduled)
    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB)
    s, mem = _offload_with(a, data(MiB))
    t = threading.Thread(target=a.restore, args=(s,))
    t.start()
    assert handing.wait(10)
    a.close()
    assert mem.closed  # zeroed and released before close returned
    t.join()


def test_an_offload_right_after_a_restore_keeps_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard is resident again once restore registered it, so another thread may offload it
    while the restore is still handing its old copy to the discard thread: the restore must then
    remove only its own record, not the new offload's (the shard would be lost: out of VRAM, its
    new host copy unreachable)."""
    real = mig._discard_soon
    handing, offloaded_again = threading.Event(), threading.Event()

    def descheduled(mgr: Any, copy: Any) -> None:
        handing.set()
        assert offloaded_again.wait(10)
        real(mgr, copy)

    monkeypatch.setattr(mig, "_discard_soon", descheduled)
    payload = data(MiB)
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB) as a:
        s = a.seal_model(payload)
        a.offload(s, "host")
        t = threading.Thread(target=a.restore, args=(s,))
        t.start()
        assert handing.wait(10)
        a.offload(s, "host")  # resident again: offloaded anew
        offloaded_again.set()
        t.join()
        monkeypatch.setattr(mig, "_discard_soon", real)
        assert a.offloaded_shards() == [s]
        a.restore(s)
        assert a._entry(s).buf.read(0, len(payload)) == payload
