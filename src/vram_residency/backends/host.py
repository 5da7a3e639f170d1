"""The host backend: device memory *emulated* in host RAM.

It exists so that the library, its tests and the worker service run on machines without a GPU.
It never claims to be VRAM: ``emulated`` is True and ``describe()`` says so, and everything that
shows a backend (CLI, service, metrics, seal-time logs) shows that line.

Each buffer is an anonymous private mapping: pages come zero-filled from the kernel, are only
committed when written, and go back to the kernel on ``close()`` (after being zeroed, as the CUDA
backend does before cuMemFree).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from typing_extensions import Buffer

from vram_residency.backends.base import (
    ALIGNMENT,
    PROGRESSIVE_FIRST_CHUNK,
    PROGRESSIVE_MAX_CHUNK,
    Backend,
    Capabilities,
    DeviceBuffer,
    Priority,
    Segment,
    WhileRunning,
    check_range,
    progressive_chunks,
)
from vram_residency.errors import InsufficientVram, IntegrityViolation, InvalidInput, PolicyViolation
from vram_residency.formats.tree import HashResult, check_algorithm, check_key, digest_only, hash_units

__all__ = ["AdoptedHostBuffer", "HostBackend", "HostBuffer", "ProgressiveHostBuffer"]

_ZERO_CHUNK = 16 << 20
#: A segment table is cut into tasks of about this many bytes: small segments share a task (a
#: thousand 4 KiB tensors are a handful of tasks, not a thousand), large ones get their own.
_TASK_BYTES: Final = 8 << 20
#: A segment this large is hashed on its own with every core (hash_units threads over its units).
_LARGE_SEGMENT: Final = 64 << 20

_T = TypeVar("_T")


def _cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _default_capacity() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    # Half of physical RAM: an emulation must not be able to push the host into swap or the OOM
    # killer on its own.
    return max(ALIGNMENT, total // 2)


class HostBuffer(DeviceBuffer):
    def __init__(self, backend: HostBackend, size: int, reserved: int) -> None:
        super().__init__(size, backend.device)
        self._backend = backend
        self._reserved = reserved
        self._map = mmap.mmap(-1, reserved, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _write(self, offset: int, view: memoryview) -> None:
        self._map[offset : offset + len(view)] = view

    def _read(self, offset: int, n: int) -> bytes:
        return self._map[offset : offset + n]

    def host_view(self, length: int | None = None) -> memoryview:
        """The emulated device memory itself, in place (no copy). Host backend only: this is what
        lets a CPU executor run on the very bytes that were verified."""
        self._check_open()
        n = self._size if length is None else length
        # Within the shard: a slice would take a negative length from the end, and a length
        # past the end would hand out the rounding's padding, which no digest covers.
        check_range(self._size, 0, n)
        return memoryview(self._map)[:n]

    def _free(self) -> None:
        zeros = bytes(min(_ZERO_CHUNK, self._reserved))
        for off in range(0, self._reserved, _ZERO_CHUNK):
            end = min(off + _ZERO_CHUNK, self._reserved)
            self._map[off:end] = zeros[: end - off]
        try:
            self._map.close()
        except BufferError as exc:
            # A view exported by view() is still alive: the memory is zeroed but cannot be
            # unmapped yet; the mapping is released when the last view goes away.
            raise IntegrityViolation("host buffer freed while a view of it is still in use") from exc
        finally:
            self._backend._release(self._reserved)


class ProgressiveHostBuffer(HostBuffer):
    """``HostBackend.allocate_progressive``: the emulated counterpart of a CUDA virtual-memory
    buffer. The address range (an anonymous mapping, committed only where written) exists from
    the start, like a reserved virtual range; the emulated capacity is taken chunk by chunk in
    ``map_through``, in the very chunk sizes CUDA maps (``progressive_chunks``, at the 256-byte
    allocation granularity), like ``cuMemCreate`` of each chunk, and so can run out at any chunk
    (another allocation took the memory meanwhile), which then releases every chunk taken so
    far. The restore path runs exactly as on CUDA; only the memory behind it is host RAM."""

    def __init__(self, backend: HostBackend, size: int, reserved: int, first: int, cap: int) -> None:
        super().__init__(backend, size, reserved)
        #: The chunk sizes, in order (``progressive_chunks`` of the rounded size).
        self.chunks = progressive_chunks(reserved, ALIGNMENT, first, cap)
        #: Bytes from the start taken from the emulated capacity (mapped).
        self._charged = 0
        #: Chunks taken so far.
        self._taken = 0
        #: Set once a chunk failed: everything was released and the buffer maps nothing again.
        self._failed = False
        #: Set by ``_free`` (under ``_map_lock``): the buffer maps nothing again.
        self._released = False
        self._map_lock = threading.Lock()

    @property
    def mapped(self) -> int:
        return min(self._charged, self._size)

    @property
    def chunk_count(self) -> int:
        """Chunks taken so far."""
        return self._taken

    def _map_more(self, end: int) -> None:
        with self._map_lock:
            if self._failed:
                raise IntegrityViolation("device buffer's chunks were released after a failed mapping")
            if self._released:
                # A map_through that passed its open check before another thread's close: the
                # buffer is gone; charging chunks now would take capacity nothing gives back.
                raise IntegrityViolation("device buffer used after it was freed")
            while self._charged < end:
                k = self._taken
                m = self.chunks[k]
                try:
                    self._backend._charge(m)
                except InsufficientVram as exc:
                    self._failed = True
                    self._unmap_all()
                    raise InsufficientVram(
                        self._size,
                        exc.available,
                        f"insufficient VRAM at chunk {k} of a progressive allocation of {self._size} "
                        f"bytes: {m} bytes needed, {exc.available} available; every chunk released",
                    ) from exc
                self._charged += m
                self._taken += 1

    def _unmap_all(self) -> None:
        """Zero what was mapped and give the capacity back (callers hold ``_map_lock``)."""
        charged, self._charged, self._taken = self._charged, 0, 0
        zeros = bytes(min(_ZERO_CHUNK, charged))
        for off in range(0, charged, _ZERO_CHUNK):
            end = min(off + _ZERO_CHUNK, charged)
            self._map[off:end] = zeros[: end - off]
        if charged:
            self._backend._release(charged)

    def _free(self) -> None:
        with self._map_lock:
            self._released = True
            self._unmap_all()
        try:
            self._map.close()
        except BufferError as exc:
            raise IntegrityViolation("host buffer freed while a view of it is still in use") from exc


class AdoptedHostBuffer(HostBuffer):
    """Host memory owned by someone else (a numpy array, a CPU tensor), seen in place.

    It stands in for adopted VRAM on machines without a GPU: reads, writes and digests go to the
    owner's memory itself; ``close()`` forgets it without zeroing or freeing it, because the owner
    still uses it. It takes nothing from the emulated capacity."""

    def __init__(self, backend: HostBackend, view: memoryview) -> None:
        DeviceBuffer.__init__(self, len(view), backend.device)
        self._backend = backend
        self._reserved = 0
        self._map = view  # type: ignore[assignment]  # a memoryview slices and assigns like the mmap

    def _read(self, offset: int, n: int) -> bytes:
        return bytes(self._map[offset : offset + n])

    @property
    def adopted(self) -> bool:
        return True

    def _free(self) -> None:
        # Not ours to zero or free. Releasing our view fails only while a view() of it is alive;
        # the reference then simply goes away with the last of those.
        with contextlib.suppress(BufferError):
            self._map.release()  # type: ignore[attr-defined]


class HostBackend(Backend):
    name = "host"
    capabilities = Capabilities(
        emulated=True,
        host_view=True,
        device_pointer=False,
        adopt_host=True,
        adopt_pointer=False,
        batched_digests=True,
        progressive_allocation=True,
    )

    def __init__(
        self,
        device: int = 0,
        capacity_bytes: int | None = None,
        *,
        progressive_first_chunk: int = PROGRESSIVE_FIRST_CHUNK,
        progressive_max_chunk: int = PROGRESSIVE_MAX_CHUNK,
    ) -> None:
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise InvalidInput("device must be a non-negative integer")
        if capacity_bytes is None:
            capacity_bytes = _default_capacity()
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidInput("capacity_bytes must be a positive integer")
        for name, v in (
            ("progressive_first_chunk", progressive_first_chunk),
            ("progressive_max_chunk", progressive_max_chunk),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % ALIGNMENT:
                raise InvalidInput(f"{name} must be a positive multiple of {ALIGNMENT} bytes")
        if progressive_first_chunk > progressive_max_chunk:
            raise InvalidInput("progressive_first_chunk must not exceed progressive_max_chunk")
        super().__init__(device)
        #: A progressive buffer's chunk schedule (``progressive_chunks``): its first chunk and the
        #: cap, as on CUDA; tests shrink them to run out of emulated capacity at a chosen chunk.
        self.progressive_first_chunk = progressive_first_chunk
        self.progressive_max_chunk = progressive_max_chunk
        self._capacity = capacity_bytes
        self._used = 0
        self._lock = threading.Lock()

    def allocate(self, size: int) -> HostBuffer:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidInput("allocation size must be a positive integer")
        reserved = _round_up(size)
        with self._lock:
            available = self._capacity - self._used
            if reserved > available:
                raise InsufficientVram(reserved, available)
            self._used += reserved
        try:
            return HostBuffer(self, size, reserved)
        except (OSError, MemoryError) as exc:
            self._release(reserved)
            raise InsufficientVram(
                reserved, self.mem_info()[0], f"host emulation could not map memory: {exc}"
            ) from exc

    def allocate_progressive(self, size: int) -> ProgressiveHostBuffer:
        """A buffer whose capacity is taken chunk by chunk (``progressive_chunks`` with this
        backend's first chunk and cap) as ``map_through`` advances; see
        ``ProgressiveHostBuffer``. The chunks add up to the same 256-byte rounding as
        ``allocate``, so the memory a restored shard holds does not depend on the path it came
        back by."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidInput("allocation size must be a positive integer")
        reserved = _round_up(size)
        with self._lock:
            if reserved > self._capacity - self._used:  # could never be mapped whole: say so now
                raise InsufficientVram(reserved, self._capacity - self._used)
        try:
            return ProgressiveHostBuffer(
                self, size, reserved, self.progressive_first_chunk, self.progressive_max_chunk
            )
        except (OSError, MemoryError) as exc:
            raise InsufficientVram(
                reserved, self.mem_info()[0], f"host emulation could not map memory: {exc}"
            ) from exc

    def _charge(self, nbytes: int) -> None:
        """Take ``nbytes`` of the emulated capacity (InsufficientVram when they are not there)."""
        with self._lock:
            available = self._capacity - self._used
            if nbytes > available:
                raise InsufficientVram(nbytes, available)
            self._used += nbytes

    def adopt_host(self, memory: Buffer) -> AdoptedHostBuffer:
        """Wrap host memory that someone else owns, without copying it (the host counterpart of
        adopting a framework's VRAM). It must be writable and C-contiguous, like device memory."""
        try:
            view = memoryview(memory)
        except TypeError:
            raise InvalidInput(f"cannot adopt {type(memory).__name__}: no buffer protocol") from None
        if view.readonly:
            raise InvalidInput("cannot adopt read-only memory")
        if not view.c_contiguous:
            raise InvalidInput("cannot adopt non-contiguous memory")
        try:
            view = view.cast("B") if (view.format, view.ndim) != ("B", 1) else view
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"cannot adopt this buffer as bytes: {exc}") from None
        if not len(view):
            raise InvalidInput("cannot adopt an empty buffer")
        return AdoptedHostBuffer(self, view)

    def _release(self, reserved: int) -> None:
        with self._lock:
            self._used -= reserved

    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            return self._capacity - self._used, self._capacity

    def check_policy(self, buf: DeviceBuffer) -> None:
        if not isinstance(buf, HostBuffer) or buf._backend is not self:
            raise PolicyViolation("buffer does not belong to this backend")
        if buf.closed:
            raise IntegrityViolation("buffer was freed")
        # A progressive buffer passes only once every chunk is mapped (taken from the capacity).
        buf.check_open()

    def hash(
        self, buf: DeviceBuffer, algorithm: str, length: int | None = None, *, key: bytes | None = None
    ) -> HashResult:
        self.check_policy(buf)
        assert isinstance(buf, HostBuffer)
        view = buf.host_view(length)
        try:
            return hash_units(view, algorithm, key=key)
        finally:
            view.release()

    def _views(self, segments: Sequence[Segment]) -> list[memoryview]:
        # Check the whole table before hashing anything: a bad entry fails the call, not half of it.
        views: list[memoryview] = []
        try:
            for seg in segments:
                if not isinstance(seg, Segment):
                    raise InvalidInput(f"segment tables hold Segment entries, not {type(seg).__name__}")
                self.check_policy(seg.buf)
                check_range(seg.buf.size, 0, seg.length)
                # Keyed algorithms (nh-fast-v1) are table entries like any other; the key is
                # checked here too, so that a bad one fails the table before any work.
                check_algorithm(seg.algorithm, keyed=True)
                check_key(seg.algorithm, seg.key)
                assert isinstance(seg.buf, HostBuffer)
                views.append(seg.buf.host_view(seg.length))
        except BaseException:
            for v in views:
                v.release()
            raise
        return views

    def _run_table(
        self,
        segments: Sequence[Segment],
        one: Callable[[memoryview, Segment, int | None], _T],
        priority: Priority,
        while_running: WhileRunning | None = None,
    ) -> list[_T]:
        """``one(view, segment, threads)`` for every segment, in order: large segments one after
        another with every core, the rest batched into tasks of ~_TASK_BYTES on ONE thread pool
        for the whole table (hashlib and blake3 release the GIL on large buffers). Low-priority
        work (the scrubber) runs on the calling thread alone, leaving the other cores to serving.

        ``while_running`` (``Backend.digest_many``) runs on the calling thread once the table is
        checked: while the pool's threads hash when there is a pool (they release the GIL on
        large buffers, so the two overlap), else before the hashing, which it then cannot
        delay. If it raises, the pool's tasks finish (the pool is shut down with waiting) before
        the views are released and its exception propagates."""
        if priority not in ("normal", "low"):
            raise InvalidInput(f"priority must be 'normal' or 'low', not {priority!r}")
        background = priority == "low"
        views = self._views(segments)
        try:
            out: list[_T | None] = [None] * len(segments)
            small: list[int] = []
            for i, seg in enumerate(segments):
                if seg.length >= _LARGE_SEGMENT and not background:
                    out[i] = one(views[i], seg, None)
                else:
                    small.append(i)
            tasks: list[list[int]] = []
            size = 0
            for i in small:
                if not tasks or size >= _TASK_BYTES:
                    tasks.append([])
                    size = 0
                tasks[-1].append(i)
                size += segments[i].length

            def run(task: list[int]) -> None:
                for i in task:
                    out[i] = one(views[i], segments[i], 1)

            workers = 1 if background else min(_cpu_count(), len(tasks))
            if workers > 1:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vram-hash") as pool:
                    # map submits every task at once; the callback runs while they hash, and a
                    # raising callback leaves the with-block, which waits for every task.
                    results = pool.map(run, tasks)
                    if while_running is not None:
                        while_running()
                    list(results)
            else:
                if while_running is not None:
                    while_running()
                for task in tasks:
                    run(task)
            done = [r for r in out if r is not None]
            if len(done) != len(out):
                raise IntegrityViolation("a segment of the table was not hashed")
            return done
        finally:
            for v in views:
                v.release()

    def hash_many(self, segments: Sequence[Segment], *, priority: Priority = "normal") -> list[HashResult]:
        """Digest and unit digests of every segment, in order, in one pass over the table."""
        return self._run_table(
            segments, lambda v, s, t: hash_units(v, s.algorithm, threads=t, key=s.key), priority
        )

    def digest_many(
        self,
        segments: Sequence[Segment],
        *,
        priority: Priority = "normal",
        while_running: WhileRunning | None = None,
    ) -> list[bytes]:
        """The digest of every segment, in order (the verify path: no BLAKE3 unit digests).
        ``while_running``: see ``Backend.digest_many`` and ``_run_table``."""
        return self._run_table(
            segments,
            lambda v, s, t: digest_only(v, s.algorithm, threads=t, key=s.key),
            priority,
            while_running,
        )

    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        self.check_policy(buf)
        assert isinstance(buf, HostBuffer)
        out = out.cast("B") if out.format != "B" else out
        check_range(buf.size, offset, len(out))
        out[:] = buf._map[offset : offset + len(out)]

    def can_access_peer(self, other: Backend) -> bool:
        # Two emulated devices share one address space: a copy between them is one memmove.
        return isinstance(other, HostBackend)

    def copy_from(
        self, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, offset: int, length: int
    ) -> None:
        if not isinstance(src_backend, HostBackend):
            super().copy_from(dst, src_backend, src, offset, length)
            return
        self.check_policy(dst)
        src_backend.check_policy(src)
        assert isinstance(dst, HostBuffer)
        assert isinstance(src, HostBuffer)
        check_range(src.size, offset, length)
        check_range(dst.size, offset, length)
        dst._map[offset : offset + length] = src._map[offset : offset + length]

    def describe(self) -> str:
        return (
            f"host (EMULATION: 'device' memory is ordinary host RAM, not VRAM; "
            f"capacity {self._capacity} bytes)"
        )
