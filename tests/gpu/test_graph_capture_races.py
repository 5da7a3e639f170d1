"""CUDA graph captures beside allocations and frees made by other threads (found in review).

The memory resource (``backend._mr``) zeroes every new allocation and every freed one on the
backend's compute stream (cuMemsetD8Async, then a synchronization), without the backend's lock.
Had the normal lane's graphs been captured on that stream, another thread's memset would have
joined the capture instead of running, and its synchronization of a capturing stream would have
failed (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED): the allocation failing, or a free going ahead with
the bytes not zeroed, and the verify's key marked never to be captured. The compute lane captures
on a stream of its own (``GraphCache(capture_stream=...)``) and launches on the compute stream.

A later run (H200, 2026-11-30) failed one graph's launch with CUDA_ERROR_UNKNOWN in this test: a
graph captured while the other thread's cuMemAlloc and cuMemFree ran (calls CUDA names as
potentially unsafe beside a relaxed capture). Measured there with this test's churn and no pause:
93 of 37,200 first launches failed without a gate, 16 of 78,120 with the capture gate
(``_core.capture_gate``: the backend's own cuMemAlloc and cuMemFree wait for a capture), 0 of
39,360 with no other thread. A launch that fails queued nothing, and ``GraphCache.run`` queues the
same work directly: every digest must still be right, and such launches stay rare (at most 2 of
the 120 here; about 1 in 5,000 was measured)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from vram_residency.backends.cuda import CudaBackend, _nh_fast
from vram_residency.backends.cuda._nh_fast import nh_fast_digest

pytestmark = pytest.mark.gpu

MIB = 1 << 20


def test_allocations_on_another_thread_survive_graph_captures(cuda_backend: CudaBackend) -> None:
    assert _nh_fast.GRAPHS
    buf = cuda_backend.allocate(4 * MIB)
    key = os.urandom(32)
    stop = threading.Event()
    errors: list[BaseException] = []
    churned = 0

    def churn() -> None:
        nonlocal churned
        while not stop.is_set():
            try:
                b = cuda_backend.allocate(64 << 10)  # zero-filled on the compute stream
                b.close()  # zeroed on the compute stream before cuMemFree
                churned += 1
            except Exception as exc:  # the symptom under test
                errors.append(exc)

    with cuda_backend.kernel_session() as ks:
        graphs = ks.graphs
    captured0, failed0 = graphs.captured, graphs.launch_failed
    keys = 120
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over often: the capture window is short
    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for i in range(keys):
            n = 4096 * (i + 1) + 16  # a new table key each time: captured on its third call
            digests = {nh_fast_digest(cuda_backend, buf.device_pointer, n, key) for _ in range(3)}
            assert len(digests) == 1, n  # direct, direct, then the graph: the same digest
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
        buf.close()
    assert churned > 0
    assert [type(e).__name__ + ": " + str(e) for e in errors] == []
    # Every key's capture succeeded (an invalidated capture marks the key never to capture).
    assert graphs.captured - captured0 == keys
    assert graphs.launch_failed - failed0 <= 2
