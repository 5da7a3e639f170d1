"""CUDA copy primitives for migration, offload and restore (``Backend.copy_from`` and friends).

Bound into ``CudaBackend`` as methods. Between two GPUs the bytes go peer to peer
(``cuMemcpyPeerAsync`` after ``cuCtxEnablePeerAccess``) where ``cuDeviceCanAccessPeer`` allows it,
and otherwise through two pinned host buffers in turn (device to host on the source's copy
stream, host to device on the destination's). ``copy_and_hash_from`` launches the destination's
digest kernels on each chunk's units as soon as that chunk's copy has landed (an event on the copy
stream that the compute stream waits for), so hashing runs behind the copy instead of after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vram_residency.backends.base import (
    COPY_CHUNK,
    Backend,
    DeviceBuffer,
    HostMemory,
    LandedHook,
    check_range,
)
from vram_residency.backends.cuda._driver import check, driver, error_name
from vram_residency.backends.cuda._staging import PinnedHostBuffer, host_address
from vram_residency.errors import IntegrityViolation, InvalidInput
from vram_residency.formats.tree import UNIT_SIZE, HashResult, check_algorithm

if TYPE_CHECKING:
    from vram_residency.backends.cuda._backend import CudaBackend, CudaBuffer

__all__ = [
    "PinnedHostMemory",
    "allocate_host",
    "can_access_peer",
    "copy_and_hash_from",
    "copy_from",
    "peer_copy_raw",
    "read_into",
]


class PinnedHostMemory(HostMemory):
    """Page-locked host memory for offloads and restores: the copy engines reach it directly."""

    def __init__(self, size: int) -> None:
        self._buf: PinnedHostBuffer | None = PinnedHostBuffer(size)

    @property
    def view(self) -> memoryview:
        if self._buf is None:
            raise IntegrityViolation("pinned host memory used after it was released")
        return self._buf.view

    @property
    def address(self) -> int:
        if self._buf is None:
            raise IntegrityViolation("pinned host memory used after it was released")
        return self._buf.address

    def close(self) -> None:
        if self._buf is not None:
            buf, self._buf = self._buf, None
            buf.array.fill(0)  # offloaded model bytes do not linger in freed pinned pages
            buf.close()


def _own(backend: CudaBackend, buf: DeviceBuffer) -> CudaBuffer:
    from vram_residency.backends.cuda._backend import CudaBuffer

    if not isinstance(buf, CudaBuffer) or buf._backend is not backend:
        raise InvalidInput("buffer does not belong to this CUDA backend")
    buf._check_open()
    return buf


def allocate_host(self: CudaBackend, size: int) -> HostMemory:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidInput("host memory size must be a positive integer")
    self._activate()
    return PinnedHostMemory(size)


def read_into(self: CudaBackend, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
    cbuf = _own(self, buf)
    out = out.cast("B") if out.format != "B" else out
    n = len(out)
    check_range(cbuf.size, offset, n)
    if not n:
        return
    addr, _keep = host_address(out)
    with cbuf._lock:
        cbuf._check_open()
        self._activate()
        check(driver().cuMemcpyDtoHAsync(addr, cbuf._ptr + offset, n, self._copy_stream), "cuMemcpyDtoHAsync")
        self._sync(self._copy_stream, "device-to-host copy")


def can_access_peer(self: CudaBackend, other: Backend) -> bool:
    from vram_residency.backends.cuda._backend import CudaBackend

    if not isinstance(other, CudaBackend):
        return False
    if other.device == self.device:
        return True
    ok = check(driver().cuDeviceCanAccessPeer(self._cudev, other._cudev), "cuDeviceCanAccessPeer")
    return bool(ok)


def _enable_peer(dst: CudaBackend, src: CudaBackend) -> None:
    """Let ``dst``'s context reach ``src``'s memory (idempotent: "already enabled" is success)."""
    dst._activate()
    drv = driver()
    (err,) = drv.cuCtxEnablePeerAccess(src._ctx, 0)
    if err != drv.CUresult.CUDA_SUCCESS and error_name(err) != "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED":
        check((err,), "cuCtxEnablePeerAccess")


class _Mover:
    """Issues chunk copies from ``src`` (on ``sb``) into ``dst`` (on ``db``) on ``db``'s copy stream:
    peer to peer, device to device on one GPU, or staged through two pinned buffers."""

    def __init__(self, db: CudaBackend, dst: CudaBuffer, sb: CudaBackend, src: CudaBuffer) -> None:
        self.db, self.dst, self.sb, self.src = db, dst, sb, src
        self.same = db.device == sb.device
        self.peer = self.same or can_access_peer(db, sb)
        self.stage: list[tuple[PinnedHostBuffer, object]] = []
        if self.peer and not self.same:
            _enable_peer(db, sb)

    def issue(self, offset: int, length: int) -> None:
        drv = driver()
        db, sb = self.db, self.sb
        d, s = self.dst._ptr + offset, self.src._ptr + offset
        if self.same:
            db._activate()
            check(drv.cuMemcpyDtoDAsync(d, s, length, db._copy_stream), "cuMemcpyDtoDAsync")
            return
        if self.peer:
            db._activate()
            check(
                drv.cuMemcpyPeerAsync(d, db._ctx, s, sb._ctx, length, db._copy_stream), "cuMemcpyPeerAsync"
            )
            return
        # No peer access: device to host on the source, host to device on the destination, two
        # pinned buffers in turn so that one is read back while the other is written.
        if not self.stage:
            db._activate()
            no_timing = int(drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
            for _ in range(2):
                pinned = PinnedHostBuffer(COPY_CHUNK)
                self.stage.append((pinned, check(drv.cuEventCreate(no_timing), "cuEventCreate")))
        for i, off in enumerate(range(0, length, COPY_CHUNK)):
            m = min(COPY_CHUNK, length - off)
            pinned, done = self.stage[i % 2]
            db._activate()
            check(drv.cuEventSynchronize(done), "waiting for a staging buffer")
            sb._activate()
            check(drv.cuMemcpyDtoHAsync(pinned.address, s + off, m, sb._copy_stream), "cuMemcpyDtoHAsync")
            sb._sync(sb._copy_stream, "device-to-host copy (staged migration)")
            db._activate()
            check(drv.cuMemcpyHtoDAsync(d + off, pinned.address, m, db._copy_stream), "cuMemcpyHtoDAsync")
            check(drv.cuEventRecord(done, db._copy_stream), "cuEventRecord")

    def wait(self) -> None:
        self.db._activate()
        self.db._sync(self.db._copy_stream, "migration copy")

    def close(self) -> None:
        if self.stage:
            drv = driver()
            self.db._activate()
            self.db._sync(self.db._copy_stream, "migration copy")
            for pinned, ev in self.stage:
                pinned.close()
                drv.cuEventDestroy(ev)
            self.stage.clear()


def _pair(
    self: CudaBackend, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, offset: int, length: int
) -> tuple[CudaBuffer, CudaBackend, CudaBuffer]:
    from vram_residency.backends.cuda._backend import CudaBackend

    assert isinstance(src_backend, CudaBackend)
    cdst = _own(self, dst)
    csrc = _own(src_backend, src)
    if cdst is csrc:
        raise InvalidInput("source and destination are the same buffer")
    check_range(csrc.size, offset, length)
    check_range(cdst.size, offset, length)
    return cdst, src_backend, csrc


def copy_from(
    self: CudaBackend, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, offset: int, length: int
) -> None:
    from vram_residency.backends.cuda._backend import CudaBackend

    if not isinstance(src_backend, CudaBackend):
        Backend.copy_from(self, dst, src_backend, src, offset, length)
        return
    cdst, sb, csrc = _pair(self, dst, src_backend, src, offset, length)
    if not length:
        return
    with cdst._lock, csrc._lock:
        cdst._check_open()
        csrc._check_open()
        mover = _Mover(self, cdst, sb, csrc)
        try:
            mover.issue(offset, length)
            mover.wait()
        finally:
            mover.close()


def copy_and_hash_from(
    self: CudaBackend,
    dst: DeviceBuffer,
    src_backend: Backend,
    src: DeviceBuffer,
    length: int,
    algorithm: str,
    *,
    on_landed: LandedHook | None = None,
) -> HashResult:
    from vram_residency.backends.cuda._backend import CudaBackend, _HashJob

    if not isinstance(src_backend, CudaBackend):
        return Backend.copy_and_hash_from(self, dst, src_backend, src, length, algorithm, on_landed=on_landed)
    algorithm = check_algorithm(algorithm)
    cdst, sb, csrc = _pair(self, dst, src_backend, src, 0, length)
    drv = driver()
    # The source stays locked for the whole copy (nobody frees it underneath); the destination is
    # locked too, except while a fault-injection hook runs (it writes through the buffer's API).
    with csrc._lock, self._lock:
        csrc._check_open()
        cdst._lock.acquire()
        try:
            cdst._check_open()
            mover = _Mover(self, cdst, sb, csrc)
            try:
                self._activate()
                job = _HashJob(self, algorithm, cdst._ptr, length, True)
                launched = 0
                for off in range(0, length, COPY_CHUNK):
                    m = min(COPY_CHUNK, length - off)
                    mover.issue(off, m)
                    if on_landed is not None:
                        mover.wait()
                        cdst._lock.release()
                        try:
                            on_landed(cdst, off, m)
                        finally:
                            cdst._lock.acquire()
                        cdst._check_open()
                    ready = job.units if off + m >= length else (off + m) // UNIT_SIZE
                    if ready > launched:
                        self._activate()
                        check(drv.cuEventRecord(self._xfer_event, self._copy_stream), "cuEventRecord")
                        check(drv.cuStreamWaitEvent(self._stream, self._xfer_event, 0), "cuStreamWaitEvent")
                        job.launch_units(launched, ready)
                        launched = ready
                if launched < job.units:
                    job.launch_units(launched, job.units)
                result = job.finish()[1]
                mover.wait()
            finally:
                mover.close()
        finally:
            cdst._lock.release()
    if result is None:  # pragma: no cover - the job was built with units
        raise IntegrityViolation("digest kernels returned no unit digests")
    return result


def peer_copy_raw(
    self: CudaBackend, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, length: int
) -> None:
    """The plain copy with nothing verified, in the same chunks as ``copy_and_hash_from``: the
    baseline a benchmark measures verified migration against."""
    cdst, sb, csrc = _pair(self, dst, src_backend, src, 0, length)
    with cdst._lock, csrc._lock:
        mover = _Mover(self, cdst, sb, csrc)
        try:
            for off in range(0, length, COPY_CHUNK):
                mover.issue(off, min(COPY_CHUNK, length - off))
            mover.wait()
        finally:
            mover.close()
