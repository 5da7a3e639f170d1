"""Restore through progressive allocation (``Capabilities.progressive_allocation``) on the host
backend, which takes its emulated capacity chunk by chunk exactly where CUDA creates and maps
each chunk (cuMemCreate): the same restore code path as on the GPU, with real capacity running
out at a real chunk.

Each failure test checks the invariant of issue 13: the shard stays offloaded and restorable,
and the device's free memory is back to what it was before the attempt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sources.conftest import Recorder
from vram_residency import VramManager
from vram_residency import _migrate as mig
from vram_residency.backends.base import ALIGNMENT, COPY_CHUNK, DeviceBuffer, progressive_chunks
from vram_residency.backends.host import HostBackend, HostBuffer, ProgressiveHostBuffer
from vram_residency.errors import InsufficientVram, IntegrityViolation, InvalidInput, NotSealed
from vram_residency.formats.tree import SHA256_TREE_V1, UNIT_SIZE, hash_units

TOKEN = "progressive-restore-token-0123456789ab"
MiB = 1 << 20


def _round(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@pytest.fixture
def backend() -> Iterator[HostBackend]:
    # Chunks of 1 MiB doubling up to 8 MiB (CUDA: 32 MiB doubling up to 512 MiB).
    b = HostBackend(0, capacity_bytes=32 * MiB, progressive_first_chunk=MiB, progressive_max_chunk=8 * MiB)
    yield b
    b.close()


def test_declared() -> None:
    assert HostBackend.capabilities.progressive_allocation


@pytest.mark.parametrize("chunk", [0, -MiB, 100, True, 1.5])
@pytest.mark.parametrize("which", ["progressive_first_chunk", "progressive_max_chunk"])
def test_bad_chunk_size(chunk: Any, which: str) -> None:
    with pytest.raises(InvalidInput):
        HostBackend(0, capacity_bytes=MiB, **{which: chunk})


def test_first_chunk_above_the_cap() -> None:
    with pytest.raises(InvalidInput, match="must not exceed"):
        HostBackend(0, capacity_bytes=MiB, progressive_first_chunk=2 * MiB, progressive_max_chunk=MiB)


def test_chunks_follow_the_schedule(backend: HostBackend) -> None:
    """1 MiB, doubling, then near-equal parts of the rest; each map_through maps whole chunks
    and map_chunk_at says how far the prefix reaches (what a copy may queue up to)."""
    buf = backend.allocate_progressive(20 * MiB + 5)
    assert isinstance(buf, ProgressiveHostBuffer)
    assert buf.chunks == [MiB, 2 * MiB, 4 * MiB, 13 * MiB // 2, 13 * MiB // 2 + ALIGNMENT]
    assert buf.chunks == progressive_chunks(20 * MiB + ALIGNMENT, ALIGNMENT, MiB, 8 * MiB)
    assert buf.map_chunk_at(0) == MiB and buf.chunk_count == 1
    assert buf.map_chunk_at(MiB - 1) == MiB
    assert buf.map_chunk_at(MiB) == 3 * MiB and buf.chunk_count == 2
    assert buf.map_chunk_at(7 * MiB) == 27 * MiB // 2
    assert buf.map_chunk_at(20 * MiB + 4) == 20 * MiB + 5 and buf.chunk_count == 5
    with pytest.raises(InvalidInput):
        buf.map_chunk_at(20 * MiB + 5)
    buf.close()


def test_partially_mapped_buffer_is_written_in_its_prefix_only(backend: HostBackend) -> None:
    free0 = backend.mem_info()[0]
    n = 7 * MiB + 5
    buf = backend.allocate_progressive(n)
    assert isinstance(buf, ProgressiveHostBuffer)
    assert buf.chunks == [MiB, 2 * MiB, 4 * MiB + ALIGNMENT]
    assert buf.mapped == 0 and backend.mem_info()[0] == free0  # nothing taken before mapping
    buf.map_through(MiB + 1)  # two chunks
    assert buf.mapped == 3 * MiB and backend.mem_info()[0] == free0 - 3 * MiB
    buf.write(0, b"a" * (3 * MiB))
    assert buf.read(3 * MiB - 3, 3) == b"aaa"
    with pytest.raises(IntegrityViolation, match="not mapped yet"):
        buf.write(3 * MiB - 1, b"xy")
    with pytest.raises(IntegrityViolation, match="not mapped yet"):
        buf.read(3 * MiB, 1)
    # Nothing that digests, checks or exposes the buffer accepts it before it is whole.
    with pytest.raises(IntegrityViolation, match="before all of its memory was mapped"):
        backend.hash(buf, SHA256_TREE_V1)
    with pytest.raises(IntegrityViolation, match="before all of its memory was mapped"):
        backend.check_policy(buf)
    with pytest.raises(IntegrityViolation, match="before all of its memory was mapped"):
        buf.host_view()
    with pytest.raises(InvalidInput):
        buf.map_through(n + 1)
    buf.map_through(n)
    assert buf.mapped == n and backend.mem_info()[0] == free0 - _round(n)
    payload = os.urandom(n)
    buf.write(0, payload)
    backend.check_policy(buf)
    assert backend.hash(buf, SHA256_TREE_V1) == hash_units(payload, SHA256_TREE_V1)
    buf.close()
    assert backend.mem_info()[0] == free0
    with pytest.raises(IntegrityViolation, match="freed"):
        buf.map_through(1)


def test_chunk_failure_releases_every_chunk(backend: HostBackend) -> None:
    """Capacity runs out at chunk 2 (1 + 2 MiB fit, the 5 MiB chunk does not): InsufficientVram,
    every chunk already taken is zeroed and given back, and the buffer is unusable from then on
    (closing it frees nothing twice)."""
    free0 = backend.mem_info()[0]
    n = 8 * MiB
    buf = backend.allocate_progressive(n)
    assert isinstance(buf, ProgressiveHostBuffer)
    assert buf.chunks == [MiB, 2 * MiB, 5 * MiB]
    blocker = backend.allocate(free0 - 4 * MiB)  # room for chunks 0 and 1, not for chunk 2
    try:
        before = backend.mem_info()[0]
        with pytest.raises(InsufficientVram, match="at chunk 2 ") as info:
            buf.map_through(n)
        assert info.value.retriable and info.value.needed == n
        assert buf.mapped == 0 and backend.mem_info()[0] == before
        with pytest.raises(IntegrityViolation):
            buf.write(0, b"x")
        with pytest.raises(IntegrityViolation):
            backend.check_policy(buf)
        with pytest.raises(IntegrityViolation, match="released"):
            buf.map_through(MiB)  # never maps again, even where memory is free
        assert backend.mem_info()[0] == before
        buf.close()
        assert backend.mem_info()[0] == before
    finally:
        blocker.close()
    assert backend.mem_info()[0] == free0


def test_chunks_released_are_zeroed(backend: HostBackend) -> None:
    buf = backend.allocate_progressive(4 * MiB)  # chunks of 1 and 3 MiB
    buf.map_through(MiB)
    buf.write(0, b"\xaa" * MiB)
    mm = buf._map  # the emulated memory itself, still mapped after its chunks were given back
    blocker = backend.allocate(backend.mem_info()[0])
    try:
        with pytest.raises(InsufficientVram):
            buf.map_through(4 * MiB)
        assert mm[:MiB] == bytes(MiB)
    finally:
        blocker.close()
        buf.close()


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 6 * MiB),
    first_units=st.integers(1, 16),
    cap_units=st.integers(16, 64),
    steps=st.lists(st.integers(1, 6 * MiB), max_size=6),
)
def test_mapping_in_any_steps_takes_what_allocate_takes(
    size: int, first_units: int, cap_units: int, steps: list[int]
) -> None:
    """However the prefix grows, it ends on a chunk boundary of the schedule, and a whole
    progressive buffer holds exactly what ``allocate`` would (256-byte rounding) and gives all
    of it back."""
    b = HostBackend(
        0,
        capacity_bytes=16 * MiB,
        progressive_first_chunk=first_units * 64 * 1024,
        progressive_max_chunk=cap_units * 64 * 1024,
    )
    free0 = b.mem_info()[0]
    buf = b.allocate_progressive(size)
    ends = {sum(buf.chunks[: k + 1]) for k in range(len(buf.chunks))}
    mapped = 0
    for s in steps:
        end = min(s, size)
        buf.map_through(end)
        assert buf.mapped >= end and buf.mapped >= mapped
        assert buf.mapped == size or buf.mapped in ends
        assert free0 - b.mem_info()[0] == (_round(size) if buf.mapped == size else buf.mapped)
        mapped = buf.mapped
    buf.map_through(size)
    assert buf.mapped == size and free0 - b.mem_info()[0] == _round(size)
    buf.close()
    assert b.mem_info()[0] == free0


# -- restore through VramManager --------------------------------------------------------------------


@pytest.fixture
def sink() -> Recorder:
    return Recorder()


def _manager(sink: Recorder, capacity: int) -> VramManager:
    m = VramManager(TOKEN, 0, backend="host", capacity_bytes=capacity, audit=sink, worker_id="w")
    backend = m.store.backend
    assert isinstance(backend, HostBackend)
    backend.progressive_first_chunk, backend.progressive_max_chunk = MiB, 8 * MiB
    return m


@pytest.mark.parametrize("to", ["host", "file"])
def test_restore_uses_progressive_allocation(sink: Recorder, tmp_path: Any, to: str) -> None:
    payload = os.urandom(5 * MiB + 3)
    with _manager(sink, 32 * MiB) as m:
        s = m.seal_model(payload)
        assert type(m._entry(s).buf) is HostBuffer  # sealing allocates plainly
        before = m.available_vram()
        m.offload(s, to, tmp_path / "s.bin" if to == "file" else None)  # type: ignore[arg-type]
        assert m.restore(s) == 0
        buf = m._entry(s).buf
        assert isinstance(buf, ProgressiveHostBuffer) and buf.mapped == buf.size == len(payload)
        m.verify_sealed(s)
        assert buf.read(0, len(payload)) == payload
        assert m.available_vram() == before
        # Migration and seals stay on the plain allocation.
        with VramManager(TOKEN, 1, backend="host", capacity_bytes=32 * MiB, worker_id="w") as other:
            t = m.migrate(s, other)
            assert type(other._entry(t).buf) is HostBuffer
            other.verify_sealed(t)


def test_restore_running_out_at_a_chunk_leaves_the_shard_offloaded(sink: Recorder) -> None:
    """Another allocation takes the memory while the restore lands its first copy chunk: mapping
    fails at the chunk after the next one (1 MiB doubling to 4 MiB, then near-equal parts: the
    first copy chunk maps chunks 0..k0, the hook leaves room for chunk k0 + 1 only), the restore
    raises the allocation error every allocation failure raises, nothing stays allocated, the
    shard is still offloaded, and it restores once the memory is back."""
    n = COPY_CHUNK + 8 * UNIT_SIZE + 11
    chunks = progressive_chunks(_round(n), ALIGNMENT, MiB, 4 * MiB)
    ends = [sum(chunks[: k + 1]) for k in range(len(chunks))]
    k0 = next(k for k, e in enumerate(ends) if e >= COPY_CHUNK)  # the first copy chunk's last
    assert k0 + 2 < len(chunks)
    with _manager(sink, COPY_CHUNK + 16 * MiB) as m:
        backend = m.store.backend
        assert isinstance(backend, HostBackend)
        backend.progressive_max_chunk = 4 * MiB
        payload = os.urandom(n)
        s = m.seal_model(payload)
        m.offload(s)
        before = m.available_vram()
        held: list[DeviceBuffer] = []

        def grab(target: DeviceBuffer | memoryview, offset: int, length: int) -> None:
            if offset == 0 and not held:
                # Leave chunk k0 + 1's room: it maps, chunk k0 + 2 does not.
                held.append(backend.allocate(backend.mem_info()[0] - chunks[k0 + 1]))

        sink.events.clear()
        with pytest.raises(InsufficientVram, match=f"at chunk {k0 + 2} ") as info:
            mig.restore(m.store, s, on_landed=grab)
        assert info.value.retriable
        assert m.offloaded_shards() == [s] and m.shards() == []
        with pytest.raises(NotSealed):
            m.verify_sealed(s)
        held.pop().close()
        assert m.available_vram() == before
        assert sink.names() == ["VramAllocated", "SealFailed", "VramDeallocated"]
        assert "InsufficientVram" in sink.events[1][1]["reason"]
        assert m.restore(s) == 0
        m.verify_sealed(s)
        assert m._entry(s).buf.read(n - 11, 11) == payload[-11:]


def test_restore_that_does_not_fit_allocates_nothing(sink: Recorder) -> None:
    with _manager(sink, 16 * MiB) as m:
        s = m.seal_model(os.urandom(6 * MiB))
        m.offload(s)
        backend = m.store.backend
        blocker = backend.allocate(12 * MiB)
        try:
            before = m.available_vram()
            with pytest.raises(InsufficientVram):
                m.restore(s)
            assert m.available_vram() == before and m.offloaded_shards() == [s]
        finally:
            blocker.close()
        m.restore(s)
        m.verify_sealed(s)
