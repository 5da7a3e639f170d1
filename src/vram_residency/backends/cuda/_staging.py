"""Pinned (page-locked) host memory, from cuda.core: staging buffers for copies into VRAM, and
host-side arrays that callers may fill directly (for example by reading a file into them).

DMA engines read only pinned memory. A copy from ordinary (pageable) memory makes the driver copy
through its own small staging area first, which the starting design measured at about 8 GB/s
against 55 GB/s pinned. So writes go through a bounded pool of our own pinned buffers (by default
two of 64 MiB): while the copy engine moves one buffer to the device, host threads fill the other.
Bytes that are already pinned are copied directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from vram_residency.backends.cuda._core import core_errors, pinned_resource

__all__ = ["HostPool", "PinnedHostBuffer", "host_address", "parallel_copy"]


class PinnedHostBuffer:
    """``size`` bytes of page-locked host memory from cuda.core's ``LegacyPinnedMemoryResource``
    (``cuMemAllocHost``), freed by ``close``. Create it with a CUDA context current (the backend's
    ``_activate``): cuda.core records a deallocation stream with each buffer.

    ``dev``: the backend's cuda.core Device, made current before freeing. cuda.core's resource
    synchronizes the buffer's deallocation stream (the default stream of the context it was made
    in, which our non-blocking streams never wait on) before ``cuMemFreeHost``, and that needs a
    current context whichever thread frees the buffer.

    ``array`` is a writable NumPy view and ``view`` a memoryview of the same bytes; both become
    invalid once the buffer is closed, so keep them no longer than the buffer.
    """

    def __init__(self, size: int, dev: Any = None) -> None:
        if size <= 0:
            raise ValueError("pinned buffer size must be positive")
        self.size = size
        self._dev = dev
        with core_errors("allocating pinned host memory"):
            self._mem: Any = pinned_resource().allocate(size)
        self._ptr: int | None = int(self._mem.handle)
        raw = (ctypes.c_ubyte * size).from_address(self._ptr)
        self.array: npt.NDArray[np.uint8] = np.ctypeslib.as_array(raw)
        self.view = memoryview(raw).cast("B")

    @property
    def address(self) -> int:
        if self._ptr is None:
            raise ValueError("pinned buffer is closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        if self._ptr is not None:
            self._ptr = None
            self.view.release()
            mem, self._mem = self._mem, None
            with core_errors("freeing pinned host memory"):
                if self._dev is not None:
                    self._dev.set_current()
                mem.close()

    def __enter__(self) -> PinnedHostBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown the driver may already be gone.
        with contextlib.suppress(Exception):
            self.close()


def host_address(view: memoryview) -> tuple[int, npt.NDArray[np.uint8]]:
    """The address of a contiguous byte view, and the NumPy array that keeps it alive."""
    arr = np.frombuffer(view, dtype=np.uint8)
    return int(arr.ctypes.data), arr


def parallel_copy(
    pool: ThreadPoolExecutor | None,
    dst: npt.NDArray[np.uint8],
    src: npt.NDArray[np.uint8],
    threads: int = 1,
) -> None:
    """dst[:] = src, split across the pool's threads (NumPy releases the GIL while copying)."""
    n = len(src)
    # One piece per thread (at least 1 MiB each, 4 KiB aligned), so that every thread works.
    share = -(-n // max(1, threads))
    piece = max(1 << 20, -(-share // 4096) * 4096)
    if pool is None or n <= piece:
        np.copyto(dst[:n], src)
        return
    futures = [
        pool.submit(np.copyto, dst[off : min(off + piece, n)], src[off : min(off + piece, n)])
        for off in range(0, n, piece)
    ]
    for f in futures:
        f.result()


def default_copy_threads() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus))


class _Sized(Protocol):
    @property
    def size(self) -> int: ...


_B = TypeVar("_B", bound=_Sized)


class HostPool(Generic[_B]):
    """Released page-locked host buffers kept for reuse, at most ``limit`` bytes in all.

    Why: an offload used to allocate its pinned copy with ``cuMemAllocHost`` and a restore freed
    it with ``cuMemFreeHost``. Page-locking is the slow part (the kernel faults in, zeroes and
    pins every 4 KiB page, and maps it for the device): on the H200 host a 2 GiB offload took
    1.45 s (bench/results/migrate-2026-11-29.md), where the device-to-host copy at the measured
    55 GB/s takes 39 ms and host hashing at the measured 12 GB/s (16 threads) 0.18 s. Buffers
    that come back here are reused by the next ``allocate_host`` of a fitting size instead.

    Callers give back only buffers whose used bytes they zeroed (offloaded model bytes do not
    linger in pooled pages any more than in freed ones). A buffer being zeroed on its way back
    (a restore zeroes its copy on a background thread) is announced with ``returning`` first:
    ``take`` waits for such a buffer when it is the one that fits, since zeroing (tens of GB/s)
    is much faster than page-locking new memory, and an offload right after a restore would
    otherwise always miss the pool.

    ``take`` returns the smallest pooled buffer of at least ``size`` and at most ``2 * size``
    bytes (a 2 GiB buffer is not spent on a 64 MiB staging request), or None. ``give`` keeps a
    buffer if it fits under ``limit``, dropping the oldest pooled buffers to make room (the
    newest sizes are the likeliest to be asked for again); a buffer larger than ``limit``, or
    one given after ``clear``, is freed with ``free``. Thread safe."""

    def __init__(self, limit: int, free: Callable[[_B], None], *, wait_s: float = 30.0) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("pool limit must be a non-negative integer")
        self.limit = limit
        self._free = free
        self._wait_s = wait_s
        self._bufs: list[_B] = []  # oldest first
        self._incoming: list[_B] = []
        self._cond = threading.Condition()
        self._closed = False

    @property
    def pooled_bytes(self) -> int:
        with self._cond:
            return sum(b.size for b in self._bufs)

    def __len__(self) -> int:
        with self._cond:
            return len(self._bufs)

    def _fits(self, b: _B, size: int) -> bool:
        return size <= b.size <= 2 * size and b.size <= self.limit

    def take(self, size: int) -> _B | None:
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while True:
                fits = [b for b in self._bufs if self._fits(b, size)]
                if fits:
                    best = min(fits, key=lambda b: b.size)
                    self._bufs.remove(best)
                    return best
                left = deadline - time.monotonic()
                if self._closed or left <= 0 or not any(self._fits(b, size) for b in self._incoming):
                    return None
                self._cond.wait(left)

    def returning(self, buf: _B) -> None:
        """``buf`` is being zeroed and will be given back (or dropped with ``cancel``)."""
        with self._cond:
            if not self._closed:
                self._incoming.append(buf)

    def cancel(self, buf: _B) -> None:
        """``buf`` announced with ``returning`` will not come back (its zeroing failed)."""
        with self._cond:
            self._forget(buf)
            self._cond.notify_all()

    def _forget(self, buf: _B) -> None:
        for i, b in enumerate(self._incoming):
            if b is buf:
                del self._incoming[i]
                return

    def give(self, buf: _B) -> None:
        dropped: list[_B] = []
        with self._cond:
            self._forget(buf)
            if any(b is buf for b in self._bufs):
                # Given twice (a close racing another close): pooling it again would hand the
                # same memory to two takers, one offload's bytes under another's feet.
                return
            if self._closed or buf.size > self.limit:
                dropped.append(buf)
            else:
                total = sum(b.size for b in self._bufs)
                while self._bufs and total + buf.size > self.limit:
                    old = self._bufs.pop(0)
                    total -= old.size
                    dropped.append(old)
                self._bufs.append(buf)
            self._cond.notify_all()
        # Freed outside the lock: cuMemFreeHost of GiBs takes a while.
        self._free_all(dropped)

    def clear(self) -> None:
        """Free every pooled buffer; later ``give`` calls free theirs at once."""
        with self._cond:
            self._closed = True
            dropped, self._bufs = self._bufs, []
            self._incoming.clear()
            self._cond.notify_all()
        self._free_all(dropped)

    def _free_all(self, bufs: list[_B]) -> None:
        error: BaseException | None = None
        for b in bufs:
            try:
                self._free(b)
            except BaseException as exc:  # free the rest, then report the first failure
                error = error or exc
        if error is not None:
            raise error
