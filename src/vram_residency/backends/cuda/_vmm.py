"""Device memory mapped chunk by chunk through CUDA's virtual memory management (VMM), for
``CudaBackend.allocate_progressive`` (restore).

Why: restoring a 2 GiB shard from pinned host memory spent ~10 ms (1.8-10 ms seen) in one
``cuMemAlloc`` before a ~39 ms copy could start (0.77 x the raw copy, H200). With VMM the virtual
range is reserved once (``cuMemAddressReserve``, cheap) and the physical memory behind it is made
chunk by chunk (``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``) just before that chunk's
copy is queued, so the host creates chunk k+1 while the copy engine moves chunk k.

Chunk sizes (``backends.base.progressive_chunks``): small first, then doubling, capped. A first
attempt with 32 equal chunks of 64 MiB for a 2 GiB shard spent 35 ms of host time creating and
mapping them (~1.1 ms per chunk, read as a per-call cost), about the whole 39 ms copy,
and ran at 0.863 x the raw copy (H200, 2026-11-30). Doubling keeps the first copy starting
after one small chunk and brings the count to 8, with each chunk's creation behind a copy at
least half its size. ``chunk_log`` records each chunk's calls, so a GPU run shows whether the
cost is per call or per byte.

Why cuda-bindings: cuda.core 1.2 has no virtual memory management API (no address reservation,
no physical allocation handles, no mapping); every call here is ``cuda.bindings.driver``, each
result checked (``_driver.check``).

What the memory is: ``CU_MEM_ALLOCATION_TYPE_PINNED`` (in VMM terms: not migratable, the same
plain device memory ``cuMemAlloc`` gives) at ``CU_MEM_LOCATION_TYPE_DEVICE`` of this backend's
device, read-write from that device only (and from a peer a migration gives access, ``allow``).
``CudaBackend.check_policy`` checks each mapped chunk
(``VmmRange.check``).

Release (``VmmRange.release``): every byte mapped is zeroed first (the project zeroes device
memory before the driver gets it back), after the copies and kernels that may still use it, then
each chunk is unmapped and its handle released, and the reservation freed. A failure while
mapping chunk k releases everything made so far in the same way before the error is raised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from vram_residency.backends.base import PROGRESSIVE_FIRST_CHUNK, PROGRESSIVE_MAX_CHUNK, progressive_chunks
from vram_residency.backends.cuda import _driver
from vram_residency.backends.cuda._core import core_errors
from vram_residency.backends.cuda._driver import check, driver
from vram_residency.errors import CudaAllocationFailed, IntegrityViolation, PolicyViolation, VramError

__all__ = ["ChunkAllocationFailed", "ChunkTiming", "VmmRange", "granularity"]


class ChunkAllocationFailed(CudaAllocationFailed):
    """``cuMemCreate`` (or the mapping of its memory) failed at chunk ``chunk``; ``name`` is the
    driver's error name. Everything the range had created was released before this was raised;
    the backend maps it to InsufficientVram for out of memory."""

    def __init__(self, chunk: int, name: str, what: str) -> None:
        super().__init__(f"{what} of chunk {chunk} failed: {name}")
        self.chunk = chunk
        self.name = name


class ChunkTiming(NamedTuple):
    """Host seconds of one chunk's driver calls (benchmarks)."""

    size: int
    create_s: float
    map_s: float
    access_s: float


@dataclass(frozen=True, slots=True)
class _Chunk:
    address: int
    size: int
    handle: Any  # CUmemGenericAllocationHandle


def _prop(ordinal: int) -> Any:
    drv = driver()
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    return prop


def _access(ordinal: int) -> Any:
    drv = driver()
    desc = drv.CUmemAccessDesc()
    desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = ordinal
    desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return desc


def granularity(ordinal: int) -> tuple[int, int]:
    """``(minimum, recommended)`` allocation granularity of plain device memory on ``ordinal``
    (2 MiB each on current GPUs). Sizes, offsets and addresses of mappings are multiples of the
    minimum; chunks are multiples of the recommended one."""
    drv = driver()
    flags = drv.CUmemAllocationGranularity_flags
    prop = _prop(ordinal)
    minimum = int(
        check(
            drv.cuMemGetAllocationGranularity(prop, flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity",
        )
    )
    recommended = int(
        check(
            drv.cuMemGetAllocationGranularity(prop, flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
            "cuMemGetAllocationGranularity",
        )
    )
    if minimum <= 0 or recommended <= 0 or recommended % minimum:
        raise IntegrityViolation(f"unexpected VMM granularity: minimum {minimum}, recommended {recommended}")
    return minimum, recommended


def _undo(exc: BaseException, result: Any, what: str) -> None:
    """Check the result of a clean-up call made while ``exc`` is being raised: the first error
    stays the one raised; a failed clean-up is added to it as a note, not lost."""
    (err,) = result
    if err != driver().CUresult.CUDA_SUCCESS:
        exc.add_note(f"{what} while undoing a failed chunk also failed: {_driver.error_name(err)}")


class VmmRange:
    """A reserved virtual range of at least ``size`` bytes on device ``ordinal`` whose physical
    memory is created and mapped chunk by chunk (``map_through``).

    ``activate`` makes the device's context current (driver calls act on the calling thread's
    current context); ``copy_stream`` and ``zero_stream`` are the cuda.core streams that copy into
    the range and that zero it (the backend's copy and compute streams); ``release`` waits for
    both before it unmaps anything. Not thread-safe beyond the lock that orders mapping against
    release: one restore owns one range."""

    def __init__(
        self,
        ordinal: int,
        size: int,
        *,
        activate: Callable[[], None],
        copy_stream: Any,
        zero_stream: Any,
        first: int = PROGRESSIVE_FIRST_CHUNK,
        cap: int = PROGRESSIVE_MAX_CHUNK,
    ) -> None:
        drv = driver()
        self._ordinal = ordinal
        self._activate = activate
        self._copy_stream = copy_stream
        self._zero_stream = zero_stream
        self._prop = _prop(ordinal)
        #: Devices given read-write access to every chunk: this one, and peers added by ``allow``.
        self._access = [_access(ordinal)]
        self._peers: set[int] = set()
        _minimum, recommended = granularity(ordinal)
        self.size = size
        #: Bytes reserved and, once mapped whole, created: ``size`` rounded up to the recommended
        #: granularity (2 MiB on current GPUs; ``cuMemAlloc`` rounds a large size up as far).
        self.reserved = -(-size // recommended) * recommended
        #: The chunk sizes, in mapping order: each a multiple of the recommended granularity
        #: (so is every chunk's address), together exactly ``reserved``.
        self.chunks = progressive_chunks(self.reserved, recommended, first, cap)
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._mapped = 0
        self._released = False
        #: Host seconds spent creating and mapping chunks (benchmarks: what the copy hid).
        self.map_seconds = 0.0
        #: Each mapped chunk's size and the host seconds of its three calls (benchmarks).
        self.chunk_log: list[ChunkTiming] = []
        #: Test seam: called as ``hook(address, nbytes)`` after the range was zeroed and before it
        #: is unmapped (the bytes are unreachable after that), so a GPU test can read them back.
        self.before_unmap: Callable[[int, int], None] | None = None
        activate()
        # Alignment: the recommended granularity, so that every chunk's address is a multiple
        # of it (chunks are multiples of it too).
        reserve = drv.cuMemAddressReserve(self.reserved, recommended, 0, 0)
        self.base = int(check(reserve, "cuMemAddressReserve"))

    @property
    def mapped(self) -> int:
        """Bytes from ``base`` backed by mapped, accessible memory (0 once released)."""
        return self._mapped

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    @property
    def released(self) -> bool:
        return self._released

    def map_through(self, end: int) -> None:
        """Create and map chunks until ``[base, base + end)`` is mapped. On any failure every
        chunk made so far is zeroed and released with the reservation (``release``) and
        ChunkAllocationFailed (or the error the driver's failure maps to) is raised."""
        with self._lock:
            if self._released:
                raise IntegrityViolation("device memory range used after it was released")
            if end <= self._mapped:
                return
            t0 = time.perf_counter()
            try:
                self._activate()
                while self._mapped < end:
                    self._map_one()
            except BaseException as exc:
                try:
                    self._release_locked()
                except VramError as rel:
                    exc.add_note(f"releasing the chunks made so far also failed: {rel}")
                raise
            finally:
                self.map_seconds += time.perf_counter() - t0

    def _map_one(self) -> None:
        drv = driver()
        k = len(self._chunks)
        addr = self.base + self._mapped
        m = self.chunks[k]
        t0 = time.perf_counter()
        err, handle = drv.cuMemCreate(m, self._prop, 0)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise ChunkAllocationFailed(k, _driver.error_name(err), f"cuMemCreate of {m} bytes")
        try:
            t1 = time.perf_counter()
            (err,) = drv.cuMemMap(addr, m, 0, handle, 0)
            if err != drv.CUresult.CUDA_SUCCESS:
                raise ChunkAllocationFailed(k, _driver.error_name(err), "cuMemMap")
            try:
                t2 = time.perf_counter()
                (err,) = drv.cuMemSetAccess(addr, m, self._access, len(self._access))
                if err != drv.CUresult.CUDA_SUCCESS:
                    raise ChunkAllocationFailed(k, _driver.error_name(err), "cuMemSetAccess")
                t3 = time.perf_counter()
            except BaseException as exc:
                _undo(exc, drv.cuMemUnmap(addr, m), "cuMemUnmap")
                raise
        except BaseException as exc:
            _undo(exc, drv.cuMemRelease(handle), "cuMemRelease")
            raise
        self._chunks.append(_Chunk(addr, m, handle))
        self._mapped += m
        self.chunk_log.append(ChunkTiming(m, t1 - t0, t2 - t1, t3 - t2))
        if self._mapped >= self.reserved and self.reserved > self.size:
            # The rounding tail past ``size`` is never written by the copy: zero it, on the copy
            # stream (ordered before the copy stream's synchronization at the end of the restore),
            # so that no byte of the range ever shows earlier contents.
            tail = self.reserved - self.size
            check(
                drv.cuMemsetD8Async(self.base + self.size, 0, tail, self._copy_stream.handle),
                "zeroing the rounding tail",
            )

    def allow(self, peer: int) -> None:
        """Give device ``peer`` read-write access to the whole range, as ``cuCtxEnablePeerAccess``
        gives a peer access to ``cuMemAlloc`` memory. VMM mappings are not covered by that call:
        their access is set per mapping (``cuMemSetAccess``), so a peer-to-peer copy of a
        restored shard to another GPU asks for it here first. Idempotent."""
        drv = driver()
        with self._lock:
            if self._released:
                raise IntegrityViolation("device memory range used after it was released")
            if peer == self._ordinal or peer in self._peers:
                return
            self._activate()
            access = [*self._access, _access(peer)]
            for c in self._chunks:
                check(drv.cuMemSetAccess(c.address, c.size, access, len(access)), "cuMemSetAccess (peer)")
            self._access = access
            self._peers.add(peer)

    def release(self) -> None:
        """Zero every mapped byte, then unmap each chunk, release its handle and free the
        reservation. Idempotent. Every step runs even when an earlier one failed (nothing is
        left behind); the first failure is raised afterwards (IntegrityViolation when the
        bytes may not have been zeroed)."""
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._released:
            return
        self._released = True
        drv = driver()
        mapped, self._mapped = self._mapped, 0
        chunks, self._chunks = self._chunks, []
        failure: VramError | None = None

        def keep(exc: BaseException, what: str) -> None:
            nonlocal failure
            if failure is None:
                failure = exc if isinstance(exc, VramError) else IntegrityViolation(f"{what} failed: {exc}")

        try:
            self._activate()
        except Exception as exc:
            keep(exc, "making the device current")
        if mapped:
            try:
                # Copies into the range run on the copy stream and the digest kernels over it on
                # the compute stream: both must be done before the zeroing (on the compute stream)
                # and long before any unmap.
                with core_errors("waiting for copies into the range"):
                    self._copy_stream.sync()
                zs = self._zero_stream.handle
                check(drv.cuMemsetD8Async(self.base, 0, mapped, zs), "zeroing before free")
                with core_errors("zeroing before free"):
                    self._zero_stream.sync()
                if self.before_unmap is not None:
                    self.before_unmap(self.base, mapped)
            except Exception as exc:
                keep(exc, "zeroing before free")
        for c in chunks:
            # One cuMemUnmap per cuMemMap: a mapping is unmapped whole, never in part.
            (err,) = drv.cuMemUnmap(c.address, c.size)
            if err != drv.CUresult.CUDA_SUCCESS:
                keep(_driver.map_error(err, "cuMemUnmap"), "cuMemUnmap")
            (err,) = drv.cuMemRelease(c.handle)
            if err != drv.CUresult.CUDA_SUCCESS:
                keep(_driver.map_error(err, "cuMemRelease"), "cuMemRelease")
        (err,) = drv.cuMemAddressFree(self.base, self.reserved)
        if err != drv.CUresult.CUDA_SUCCESS:
            keep(_driver.map_error(err, "cuMemAddressFree"), "cuMemAddressFree")
        if failure is not None:
            raise failure

    def check(self, ordinal: int, size: int) -> None:
        """Raise PolicyViolation unless ``[base, base + size)`` is covered by this range's own
        chunks, each mapped to plain device memory of device ``ordinal``.

        Why not the pointer-attribute check of ``cuMemAlloc`` memory (one allocation holding the
        whole range): a VMM range is as many driver allocations as chunks, and what counts is
        what is mapped at each of them. So, for each chunk, the driver is asked what backs its
        first and last byte (``cuMemRetainAllocationHandle``: the very handle mapped there),
        which must be the handle we created, whose properties must say plain device memory of
        this device (type PINNED: not migratable; location DEVICE ``ordinal``); the caller checks
        the pointer attributes (memory type DEVICE, not managed, device ordinal) of each chunk
        (``chunk_addresses``)."""
        drv = driver()
        with self._lock:
            if self._released:
                raise PolicyViolation("device memory range was released")
            covered = 0
            for c in self._chunks:
                if c.address != self.base + covered:
                    raise PolicyViolation("device memory chunks are not contiguous")
                for probe in (c.address, c.address + c.size - 1):
                    held = check(drv.cuMemRetainAllocationHandle(probe), "cuMemRetainAllocationHandle")
                    try:
                        same = int(held) == int(c.handle)
                        prop = check(
                            drv.cuMemGetAllocationPropertiesFromHandle(held),
                            "cuMemGetAllocationPropertiesFromHandle",
                        )
                    finally:
                        check(drv.cuMemRelease(held), "cuMemRelease")
                    if not same:
                        raise PolicyViolation("device memory mapped in the range is not the range's own")
                    if int(prop.type) != int(drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED):
                        raise PolicyViolation("device memory chunk is not plain (pinned) device memory")
                    if int(prop.location.type) != int(drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE):
                        raise PolicyViolation("memory chunk is not device memory (location not a device)")
                    where = int(prop.location.id)
                    if where != ordinal:
                        raise PolicyViolation(f"memory chunk is on device {where}, not on device {ordinal}")
                covered += c.size
            if covered < size:
                raise PolicyViolation("range extends past the memory mapped for it")

    def chunk_addresses(self) -> list[int]:
        with self._lock:
            return [c.address for c in self._chunks]
