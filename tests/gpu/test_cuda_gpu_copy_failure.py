"""A failure part-way through a host-to-device copy (``CudaBackend._copy_in``) must not leave
copies running once the error reaches the caller: the caller may reuse its source memory, or free
the destination, whose zeroing runs on the compute stream and would not wait for a late copy
from the copy stream (review of 2026-11-30, suspected finding b)."""

from __future__ import annotations

import numpy as np
import pytest
from cuda.bindings import driver

from vram_residency.backends.cuda import CudaBackend

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def _copies_in_flight(backend: CudaBackend) -> bool:
    (err,) = driver.cuStreamQuery(backend._copy_stream.handle)
    if err == driver.CUresult.CUDA_ERROR_NOT_READY:
        return True
    assert err == driver.CUresult.CUDA_SUCCESS, err
    return False


def _boom(done: int) -> None:
    raise RuntimeError(f"injected after {done} bytes were queued")


@pytest.mark.parametrize("source", ["pinned", "pageable"])
def test_a_failure_while_copying_in_returns_only_after_the_queued_copies(
    cuda_backend: CudaBackend, source: str
) -> None:
    # Four staging-sized chunks: the failure comes right after the first one is queued, while
    # it still runs (64 MiB at ~55 GB/s is ~1.2 ms).
    n = 4 * 64 * MiB
    buf = cuda_backend.allocate(n)
    pinned = cuda_backend.pinned_host_buffer(n) if source == "pinned" else None
    pageable = np.full(n, 0x5A, dtype=np.uint8) if pinned is None else None
    try:
        if pinned is not None:
            pinned.array[:] = 0x5A
        view = pinned.view if pinned is not None else memoryview(pageable)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="injected after"):
            cuda_backend._copy_in(buf._ptr, view, _boom)
        assert not _copies_in_flight(cuda_backend)
        # The backend goes on working: the same copy without the failure lands whole.
        cuda_backend._copy_in(buf._ptr, view)
        assert buf.read(n - 16, 16) == b"\x5a" * 16
    finally:
        buf.close()
        if pinned is not None:
            pinned.close()
