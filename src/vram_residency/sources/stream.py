"""Streaming a file range into a device buffer through a small, fixed set of staging buffers.

Host memory stays bounded whatever the file size: ``staging_bytes`` (at most 256 MiB, 128 MiB by
default) is allocated once, as a few equal buffers, and reused. Reader threads fill free buffers
with ``os.preadv`` (which drops the GIL, so disk or page-cache reads run while the calling thread
copies); the calling thread alone writes to the device buffer, so backends never see a call from
a thread they did not expect. Chunks may complete out of order: each write carries its offset.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from vram_residency.backends.base import DeviceBuffer
from vram_residency.errors import InvalidInput

__all__ = ["MAX_STAGING_BYTES", "Staging", "StagingPlan", "plan_staging", "stream_into"]

#: The hard cap on host staging memory for one stream.
MAX_STAGING_BYTES: Final = 256 << 20
DEFAULT_STAGING_BYTES: Final = 128 << 20
DEFAULT_BUFFERS: Final = 2
#: With a GPU the copy engine (55 GB/s from pinned memory on an H200) outruns any one thread
#: copying out of the page cache, so reading fans out: 16 x 16 MiB, 15 reader threads. Measured
#: on an H200 host (16 cores), 16 GiB page-cached file: 3 readers 11-12 GiB/s, 7 readers 19-20,
#: 15 readers 26-28 (bench/results/seal-file-cuda-2026-11-28.md).
GPU_DEFAULT_BUFFERS: Final = 16
GPU_DEFAULT_STAGING_BYTES: Final = 256 << 20
_MIN_CHUNK: Final = 1 << 20

Progress = Callable[[int], None]
#: Sees the bytes streamed, in file order (see ``stream_into``).
Observer = Callable[[memoryview], None]


@runtime_checkable
class _PinnedAllocator(Protocol):
    """A backend that offers page-locked host memory (the CUDA backend does)."""

    def pinned_host_buffer(self, size: int) -> Any: ...


@dataclass(frozen=True, slots=True)
class StagingPlan:
    """How a stream is staged: ``buffers`` buffers of ``chunk`` bytes, ``readers`` threads."""

    buffers: int
    chunk: int
    readers: int

    @property
    def bytes(self) -> int:
        return self.buffers * self.chunk


def plan_staging(
    length: int, staging_bytes: int | None = None, buffers: int | None = None, *, backend: object = None
) -> StagingPlan:
    """Split a staging budget into equal buffers, no bigger than the data needs.

    By default 128 MiB in two buffers (one reader thread) for the host emulation, whose copy is a
    memcpy; with a GPU backend (pinned staging) 256 MiB in sixteen, so that fifteen reader
    threads keep the copy engine fed from the page cache."""
    gpu = isinstance(backend, _PinnedAllocator)
    if staging_bytes is None:
        staging_bytes = GPU_DEFAULT_STAGING_BYTES if gpu else DEFAULT_STAGING_BYTES
    budget = staging_bytes
    if buffers is None:
        buffers = GPU_DEFAULT_BUFFERS if gpu else DEFAULT_BUFFERS
    count = buffers
    for name, v in (("staging_bytes", budget), ("staging buffers", count)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InvalidInput(f"{name} must be a positive integer")
    if budget > MAX_STAGING_BYTES:
        raise InvalidInput(f"staging_bytes {budget} exceeds the {MAX_STAGING_BYTES}-byte cap")
    if count < 2:
        raise InvalidInput("at least 2 staging buffers are needed to overlap reads and copies")
    if _MIN_CHUNK * count > MAX_STAGING_BYTES:
        raise InvalidInput(f"{count} staging buffers of at least {_MIN_CHUNK} bytes exceed the cap")
    if length <= _MIN_CHUNK:  # a small file needs one buffer of its own size, nothing more
        return StagingPlan(1, max(length, 1), 1)
    # No more staging than the data needs: a file smaller than the budget is split evenly.
    chunk = min(budget // count, -(-length // count))
    chunk = max(_MIN_CHUNK, -(-chunk // 4096) * 4096)  # page multiples keep preadv copies aligned
    n_chunks = -(-length // chunk)
    count = min(count, n_chunks)
    return StagingPlan(count, chunk, max(1, count - 1))


def _read_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise InvalidInput(f"{what} is shorter than expected: it was truncated while being read")
        got += n


_STOP: Final = -1


class Staging:
    """The staging buffers of one or more streams: allocated on first use, reused by every
    stream that shares this object (the files of one model), released by ``close()``.

    With ``backend`` offering ``pinned_host_buffer`` (CUDA), the buffers are page-locked: file
    reads land directly in memory the copy engine can read, and each write to the device is one
    DMA with no bounce through the driver's own staging. Otherwise they are ``bytearray``s."""

    def __init__(self, plan: StagingPlan, backend: object = None) -> None:
        self.plan = plan
        self._pinned = backend if isinstance(backend, _PinnedAllocator) else None
        self._owners: list[Any] = []
        self._views: list[memoryview] = []

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    def views(self) -> list[memoryview]:
        if not self._views:
            try:
                for _ in range(self.plan.buffers):
                    if self._pinned is not None:
                        owner = self._pinned.pinned_host_buffer(self.plan.chunk)
                        self._owners.append(owner)
                        self._views.append(owner.view)
                    else:
                        owner = bytearray(self.plan.chunk)
                        self._owners.append(owner)
                        self._views.append(memoryview(owner))
            except BaseException:
                self.close()
                raise
        return self._views

    def close(self) -> None:
        if self._pinned is None:
            for v in self._views:
                v.release()
        for owner in self._owners:
            close = getattr(owner, "close", None)
            if close is not None:
                close()
        self._views, self._owners = [], []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_into(
    fd: int,
    file_offset: int,
    length: int,
    dest: DeviceBuffer,
    dest_offset: int = 0,
    *,
    what: str = "file",
    staging: Staging | None = None,
    progress: Progress | None = None,
    observe: Observer | None = None,
) -> None:
    """Copy ``length`` bytes of ``fd`` from ``file_offset`` into ``dest`` at ``dest_offset``.

    ``observe`` (optional) sees every byte copied, once, in file order, while it streams (for a
    plain SHA-256 of the file beside the seal's own digest: no second pass over the file). It may
    raise to abort the copy."""
    if length == 0:
        return
    if staging is None:
        with Staging(plan_staging(length)) as own:
            return stream_into(
                fd,
                file_offset,
                length,
                dest,
                dest_offset,
                what=what,
                staging=own,
                progress=progress,
                observe=observe,
            )
    plan = staging.plan
    views = staging.views()
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[int, int, int] | BaseException | None] = queue.SimpleQueue()
    for i in range(plan.buffers):
        free.put(i)
    offsets = iter(range(0, length, plan.chunk))
    next_lock = threading.Lock()
    stop = threading.Event()
    # Read-ahead advice is an optimisation: ignore systems and files that do not take it.
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, file_offset, length, os.POSIX_FADV_SEQUENTIAL)

    def reader() -> None:
        try:
            while not stop.is_set():
                idx = free.get()
                if idx == _STOP or stop.is_set():
                    return
                with next_lock:
                    rel = next(offsets, None)
                if rel is None:
                    free.put(idx)  # let the other readers see the end as well
                    return
                n = min(plan.chunk, length - rel)
                _read_into(fd, views[idx][:n], file_offset + rel, what)
                full.put((idx, rel, n))
        except BaseException as exc:
            full.put(exc if isinstance(exc, InvalidInput) else InvalidInput(f"cannot read {what}: {exc}"))
        finally:
            full.put(None)

    threads = [
        threading.Thread(target=reader, name=f"vram-stream-{i}", daemon=True) for i in range(plan.readers)
    ]
    for t in threads:
        t.start()
    held: dict[int, tuple[int, int]] = {}
    observed = 0
    try:
        done = finished = 0
        while done < length:
            item = full.get()
            if item is None:
                finished += 1
                if finished == len(threads):
                    raise InvalidInput(f"{what}: reader stopped after {done} of {length} bytes")
                continue
            if isinstance(item, BaseException):
                raise item
            idx, rel, n = item
            dest.write(dest_offset + rel, views[idx][:n])
            if observe is None:
                free.put(idx)
            else:
                # Readers finish out of order; the observer needs file order. A chunk's buffer
                # is held until every chunk before it was observed. No deadlock: readers take
                # offsets in order, so the next chunk observed is always held by some reader.
                held[rel] = (idx, n)
                while observed in held:
                    i2, n2 = held.pop(observed)
                    observe(views[i2][:n2])
                    free.put(i2)
                    observed += n2
            done += n
            if progress is not None:
                progress(n)
    finally:
        stop.set()
        for _ in threads:
            free.put(_STOP)
        for t in threads:
            t.join()
