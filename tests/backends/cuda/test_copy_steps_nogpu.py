"""``_copy_steps``: how ``CudaBackend._copy_in`` cuts a host-to-device copy, checked without a
GPU against a real progressive buffer of the host backend (``map_chunk_at``, the same method the
CUDA restore passes as ``prepare``). What it must hold for restore from pinned memory: the first
copy is the first (small) memory chunk alone, no copy crosses a memory chunk's end, and chunk
k+1 is mapped only after the copy into chunk k was handed out (queued), so that its creation
overlaps that copy."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.base import ALIGNMENT, COPY_CHUNK, progressive_chunks
from vram_residency.backends.cuda._backend import _copy_steps
from vram_residency.backends.host import HostBackend, ProgressiveHostBuffer
from vram_residency.errors import IntegrityViolation

MiB = 1 << 20


def test_without_prepare_the_copy_goes_in_steps() -> None:
    assert list(_copy_steps(10, 4, None)) == [(0, 4), (4, 4), (8, 2)]
    assert list(_copy_steps(0, 4, None)) == []


def test_restore_of_a_large_shard_follows_the_chunks() -> None:
    """A 300 MiB shard with 1 MiB doubling to 8 MiB chunks (CUDA: 32 doubling to 512), copied in
    64 MiB steps: copies end on every chunk end, and each chunk is mapped right after the copy
    before it was queued."""
    b = HostBackend(0, capacity_bytes=512 * MiB, progressive_first_chunk=MiB, progressive_max_chunk=8 * MiB)
    n = 300 * MiB + 5
    buf = b.allocate_progressive(n)
    assert isinstance(buf, ProgressiveHostBuffer)
    events: list[tuple[str, int, int]] = []

    def prepare(off: int) -> int:
        before = buf.chunk_count
        end = buf.map_chunk_at(off)
        if buf.chunk_count > before:
            events.append(("map", before, buf.chunk_count))
        return end

    steps = []
    for off, m in _copy_steps(n, COPY_CHUNK, prepare):
        events.append(("copy", off, m))
        steps.append((off, m))
    ends = list(itertools.accumulate(buf.chunks))
    assert steps[0] == (0, MiB)  # the first copy waits for the first chunk alone
    assert sum(m for _, m in steps) == n and all(m <= COPY_CHUNK for _, m in steps)
    copy_ends = {off + m for off, m in steps}
    assert {min(e, n) for e in ends} <= copy_ends  # no copy crosses a chunk's end
    # Every chunk is mapped alone, after the copy into the chunk before it was queued.
    maps = [e for e in events if e[0] == "map"]
    assert [(k, k + 1) for k in range(len(buf.chunks))] == [(a, c) for _, a, c in maps]
    for i, e in enumerate(events):
        if e[0] == "map" and e[1] > 0:
            assert events[i - 1][0] == "copy"
            assert events[i - 1][1] + events[i - 1][2] == ends[e[1] - 1]
    buf.close()


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 40 * MiB),
    step_units=st.integers(1, 64),
    first_units=st.integers(1, 8),
    cap_units=st.integers(8, 64),
)
def test_steps_cover_the_copy_and_never_cross_a_chunk(
    size: int, step_units: int, first_units: int, cap_units: int
) -> None:
    unit = 64 * 1024
    b = HostBackend(
        0,
        capacity_bytes=64 * MiB,
        progressive_first_chunk=first_units * unit,
        progressive_max_chunk=cap_units * unit,
    )
    buf = b.allocate_progressive(size)
    assert isinstance(buf, ProgressiveHostBuffer)
    assert buf.chunks == progressive_chunks(
        -(-size // ALIGNMENT) * ALIGNMENT, ALIGNMENT, first_units * unit, cap_units * unit
    )
    steps = list(_copy_steps(size, step_units * unit, buf.map_chunk_at))
    assert [off for off, _ in steps] == list(itertools.accumulate([0] + [m for _, m in steps[:-1]]))
    assert sum(m for _, m in steps) == size and buf.mapped == size
    bounds = list(itertools.accumulate(buf.chunks))
    for off, m in steps:
        k = next(i for i, e in enumerate(bounds) if e > off)  # the chunk holding off
        assert off + m <= bounds[k]
    buf.close()


def test_a_destination_that_is_not_ready_is_refused() -> None:
    with pytest.raises(IntegrityViolation, match="not ready at byte 4"):
        list(_copy_steps(10, 4, lambda off: 4))


def test_the_one_copy_seal_only_into_memory_mapped_through_its_end() -> None:
    """``write_and_hash``'s one-copy path (``_seal_one_copy``) maps nothing. Before a review of 2026-11-30 it
    was taken for any source up to 1 MiB (or pinned, up to the staging size) whatever the
    destination, so a restore into a progressive buffer with its chunks still to map copied
    into the unmapped range (tests/gpu/test_cuda_gpu_vmm_restore.py shows the fault on a GPU).
    Checked here against real buffers of the host backend: ordinary, and progressive before,
    during and after mapping."""
    from vram_residency.backends.cuda._backend import _one_copy_seal

    b = HostBackend(0, capacity_bytes=64 * MiB, progressive_first_chunk=MiB, progressive_max_chunk=4 * MiB)
    staging = 8 * MiB
    plain = b.allocate(10 * MiB)
    assert _one_copy_seal(plain, 512 << 10, staging)
    assert _one_copy_seal(plain, staging, staging)
    assert not _one_copy_seal(plain, staging + 1, staging)  # staged: more than one copy
    assert not _one_copy_seal(plain, 0, staging)
    prog = b.allocate_progressive(10 * MiB)
    assert isinstance(prog, ProgressiveHostBuffer) and prog.mapped == 0
    assert not _one_copy_seal(prog, 512 << 10, staging)  # nothing mapped yet
    prog.map_chunk_at(0)
    assert _one_copy_seal(prog, MiB, staging)  # inside the first chunk
    assert not _one_copy_seal(prog, MiB + 1, staging)  # past it
    prog.map_through(6 * MiB)
    assert _one_copy_seal(prog, prog.mapped, staging) and not _one_copy_seal(prog, prog.mapped + 1, staging)
    plain.close()
    prog.close()
