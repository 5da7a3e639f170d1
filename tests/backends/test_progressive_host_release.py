"""The host backend's progressive buffer (the emulation of a CUDA VMM range) after it is freed:
a ``map_through`` that passed its open check just before another thread's ``close`` must not
take emulated capacity for a buffer that no longer exists (CUDA's ``VmmRange`` refuses with
IntegrityViolation under its lock once released; the emulation charged the chunks and never
gave them back). The other thread's moment is reproduced by calling the buffer's mapping step
(``_map_more``, what ``map_through`` calls after its check) right after ``close``."""

from __future__ import annotations

import pytest

from vram_residency.backends.host import HostBackend, ProgressiveHostBuffer
from vram_residency.errors import IntegrityViolation

MiB = 1 << 20


def test_mapping_after_close_takes_no_capacity() -> None:
    b = HostBackend(0, capacity_bytes=64 * MiB, progressive_first_chunk=MiB, progressive_max_chunk=4 * MiB)
    buf = b.allocate_progressive(10 * MiB)
    assert isinstance(buf, ProgressiveHostBuffer)
    buf.map_through(3 * MiB)
    free_mapped = b.mem_info()[0]
    buf.close()
    free = b.mem_info()[0]
    assert free > free_mapped
    with pytest.raises(IntegrityViolation):
        buf._map_more(8 * MiB)  # the racing map_through, past its open check
    assert b.mem_info()[0] == free  # nothing taken for the freed buffer
