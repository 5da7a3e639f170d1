"""Lifetimes of memory that queued GPU work uses (the CPU side: tests/backends/cuda/
test_buffer_lifetimes_nogpu.py).

- A grown result buffer (backend), low-lane arena or low-lane pinned buffer is freed only once
  the work queued on its stream is done: cuMemFreeHost does not wait for our non-blocking
  streams, and a low arena's zeroing before cuMemFree runs on the compute stream, which is not
  ordered with the low stream. Each test queues long work that uses the buffer WITHOUT
  synchronizing (what a call that failed or was interrupted between queuing and its
  synchronization leaves behind), grows the buffer, and checks that the work was done by then
  and that the device still gives right digests.
- A peer or same-device copy that fails part-way leaves nothing in flight on the copy stream
  (``_Mover.close``).
- ``close()`` racing low-priority tables and nh-fast verifies on other threads: each call either
  completes with the right digest or is refused with a typed error; nothing crashes.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.gpu.conftest import random_bytes
from vram_residency.backends.base import Segment
from vram_residency.backends.cuda import CudaBackend, _backend, _nh_fast, open_backend
from vram_residency.backends.cuda._core import record
from vram_residency.errors import ConfigError, IntegrityViolation
from vram_residency.formats.tree import BLAKE3, NH_FAST_V1, SHA256_TREE_V1, UNIT_SIZE, hash_units

pytestmark = pytest.mark.gpu

MiB = UNIT_SIZE
KEY = bytes(range(32))


def _event_after(backend: CudaBackend, stream: Any) -> Any:
    ev = _backend._event(backend._dev, timing=False)
    record(stream, ev)
    return ev


def test_growing_the_result_buffer_waits_for_copies_queued_into_it(cuda_backend: CudaBackend) -> None:
    b = cuda_backend
    n = 1 << 30  # ~1.5 ms of unit kernels ahead of the copies back
    data = random_bytes(4 * MiB, seed=71)
    buf = b.allocate(n)
    try:
        for off in range(0, n, len(data)):
            buf.write(off, data)
        with b._lock:
            b._activate()
            job = _backend._HashJob(b, SHA256_TREE_V1, buf._ptr, n, True)
            job.launch_units(0, job.units)
            host = b._result_buffer(job._host_bytes())
            job._queue_copies(job._queue_tail(), host)
            queued = _event_after(b, b._stream)
            # Not synchronized: as after a failure between queuing and the synchronization.
            assert b._result_buffer(host.size + 1) is not host  # grown: the old one freed
            assert queued.is_done, "the old result buffer was freed with copies into it queued"
            queued.close()
        small = random_bytes(3 * MiB + 5, seed=72)
        sbuf = b.allocate(len(small))
        try:
            sbuf.write(0, small)
            assert b.hash(sbuf, SHA256_TREE_V1) == hash_units(small, SHA256_TREE_V1)
        finally:
            sbuf.close()
    finally:
        buf.close()


@pytest.mark.parametrize("grow", ["arena", "pinned"])
def test_growing_a_low_lane_buffer_waits_for_the_low_stream(cuda_backend: CudaBackend, grow: str) -> None:
    b = cuda_backend
    n = 1 << 30
    data = random_bytes(4 * MiB, seed=73)
    buf = b.allocate(n)
    try:
        for off in range(0, n, len(data)):
            buf.write(off, data)
        with b.kernel_session("low", preload=(_nh_fast.SOURCE,)) as ks:
            job = _nh_fast.new_job(ks, buf._ptr, n, KEY)  # in the low lane's arena
            host = ks.result_buffer(32 * job.units)
            job.queue_copy_back(host)  # every kernel, and the copy into the lane's pinned buffer
            queued = _event_after(b, ks.stream)
            # Past the buffer's present size, whatever earlier tests of the session grew it to
            # (the low arena is shared by every low table and nh-fast verify of the backend): a
            # request that fits frees nothing, and the check below would then only time the GPU.
            lane = b._lanes["low"]
            if grow == "arena":
                before = lane.arena_size
                ks.scratch(before + (64 << 20))  # at least scratch_bytes(n): the job is in it
                assert lane.arena_size > before
            else:
                before = host.size
                ks.result_buffer(host.size + (1 << 20))
                assert lane.host is not None and lane.host.size > before
            assert queued.is_done, f"the low lane's {grow} was freed with its work queued"
            queued.close()
        small = random_bytes(5 * MiB + 16, seed=74)
        sbuf = b.allocate(len(small))
        try:
            sbuf.write(0, small)
            got = b.digest_many([Segment(sbuf, len(small), NH_FAST_V1, KEY)], priority="low")
            assert got == [hash_units(small, NH_FAST_V1, key=KEY).digest]
        finally:
            sbuf.close()
    finally:
        buf.close()


def test_a_copy_failing_part_way_leaves_nothing_in_flight(
    cuda_backend: CudaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = cuda_backend
    n = 2 * 64 * MiB
    src, dst = b.allocate(n), b.allocate(n)
    real = _backend._Mover.issue
    calls = {"n": 0}

    def issue(self: Any, offset: int, length: int) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise IntegrityViolation("injected: the second chunk's copy failed to queue")
        for _ in range(128):  # ~16 GiB of device-to-device copying queued: milliseconds
            real(self, offset, length)

    monkeypatch.setattr(_backend._Mover, "issue", issue)
    try:
        with pytest.raises(IntegrityViolation, match="injected"):
            b.peer_copy_raw(dst, b, src, n)
        with b._lock:
            b._activate()
            after = _event_after(b, b._copy_stream)
            assert after.is_done, "copies were left in flight after the copy failed"
            after.close()
    finally:
        src.close()
        dst.close()


def test_close_racing_low_priority_work_refuses_or_completes() -> None:
    backend = open_backend(0)
    data = random_bytes(8 * MiB + 48, seed=75)
    bufs = []
    for _ in range(3):
        buf = backend.allocate(len(data))
        buf.write(0, data)
        bufs.append(buf)
    want = {
        BLAKE3: hash_units(data, BLAKE3).digest,
        NH_FAST_V1: hash_units(data, NH_FAST_V1, key=KEY).digest,
    }
    outcomes: list[str] = []
    unexpected: list[BaseException] = []
    started = threading.Barrier(3)

    def worker(alg: str, buf: Any) -> None:
        key = KEY if alg == NH_FAST_V1 else None
        started.wait()
        for _ in range(10_000):
            try:
                got = backend.digest_many(
                    [Segment(buf, len(data), alg, key), Segment(buf, len(data) - 16, alg, key)],
                    priority="low",
                )
            except (ConfigError, IntegrityViolation) as exc:
                # Refused: the backend is closing, or the buffer was freed by close().
                outcomes.append(type(exc).__name__)
                return
            except BaseException as exc:  # anything else is the bug this test looks for
                unexpected.append(exc)
                return
            if got[0] != want[alg]:
                unexpected.append(AssertionError(f"{alg}: wrong digest during close"))
                return
            outcomes.append("ok")

    threads = [threading.Thread(target=worker, args=a) for a in ((BLAKE3, bufs[0]), (NH_FAST_V1, bufs[1]))]
    for t in threads:
        t.start()
    started.wait()
    for _ in range(10_000):  # let both run a while (10 s at most), then close under them
        if outcomes.count("ok") >= 20 or unexpected:
            break
        threading.Event().wait(0.001)
    backend.close()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not unexpected, unexpected
    # Each worker ends refused (the backend closing, or its buffer freed by close), never wrong.
    assert len(outcomes) - outcomes.count("ok") == 2
    assert set(outcomes) <= {"ok", "ConfigError", "IntegrityViolation"}
    # The lanes are gone, and nothing came back to life after close.
    assert backend._lanes == {} and backend._closed
