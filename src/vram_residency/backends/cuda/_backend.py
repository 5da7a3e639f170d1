"""The CUDA backend: exact VRAM allocations, a VRAM-only pointer policy, copies through bounded
pinned staging, and digests computed by kernels over the device memory.

Built on NVIDIA's ``cuda.core`` (``_core``): the device and its primary context, streams (normal
and lowest priority), events, kernel modules and launches, pinned host memory, and an exact,
zeroing memory resource of our own. cuda-bindings is called only where cuda.core 1.2 has no API,
each place saying so: pointer attributes (the policy), range copies, peer access, memory info.

Only 32-byte digests cross back to the host when hashing: unit digests (one per MiB) for seals
and localization, and for a plain verify nothing but the root.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import operator
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from typing_extensions import Buffer

from vram_residency.backends.base import (
    ALIGNMENT,
    COPY_CHUNK,
    PROGRESSIVE_FIRST_CHUNK,
    PROGRESSIVE_MAX_CHUNK,
    Backend,
    Capabilities,
    DeviceBuffer,
    HostMemory,
    LandedHook,
    Priority,
    Segment,
    WhileRunning,
    check_range,
)
from vram_residency.backends.cuda import _batch, _core, _driver, _nh_fast, _vmm
from vram_residency.backends.cuda._core import OUT_OF_MEMORY, CuMemAllocFailed, core, core_errors
from vram_residency.backends.cuda._core import elapsed_seconds as _elapsed_seconds
from vram_residency.backends.cuda._core import event_sync as _event_sync
from vram_residency.backends.cuda._core import record as _record
from vram_residency.backends.cuda._core import stream_wait as _stream_wait
from vram_residency.backends.cuda._driver import check, driver, error_name, request_error
from vram_residency.backends.cuda._graphs import GraphCache
from vram_residency.backends.cuda._kernels import U32, U64, Arg, Module, launch
from vram_residency.backends.cuda._staging import (
    HostPool,
    PinnedHostBuffer,
    default_copy_threads,
    host_address,
    parallel_copy,
)
from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    PolicyViolation,
    UnsupportedOperation,
)
from vram_residency.formats.tree import (
    BLAKE3,
    LEAF_SIZE,
    NH_FAST_V1,
    SHA256_TREE_V1,
    UNIT_SIZE,
    HashResult,
    check_algorithm,
    check_key,
    unit_count,
)

__all__ = [
    "PRIORITIES",
    "CudaBackend",
    "CudaBuffer",
    "KernelSession",
    "Priority",
    "VmmBuffer",
    "device_count",
]

#: ``priority=`` of the digest calls (``backends.base.Priority``): "normal" (the verify path) or
#: "low" (background scrubbing: a lowest-priority stream of its own, and a wait that leaves the
#: GIL to the engine's threads: see LOW_WAIT).
PRIORITIES: Final = ("normal", "low")
#: How the low lane waits for its kernels. "block": one cuEventSynchronize on an event created
#: with blocking synchronization (the thread sleeps in the driver, without the GIL, until the GPU
#: signals; it takes the GIL back once). "poll": cuEventQuery with sleeps from 20 us to 1 ms in
#: between, which takes the GIL back at every poll: while an engine's thread holds it (a
#: transformers generate() does, launching kernels), each poll is a forced GIL hand-over. Not
#: Final: benchmarks A/B the two; a lane reads it once, when it is built (its event is made for
#: the mode), so a change applies to backends opened after it.
LOW_WAIT: str = "block"

_THREADS: Final = 256  # per block: 256 leaves (sha256-tree-v1) or 256 x 4 chunks (blake3) per unit
_GROUP: Final = 256  # nodes reduced per block above the units
#: blake3_units_split: bytes per piece (128 chunks of 1 KiB, an aligned subtree) and threads per
#: block (one per chunk); B3_SPLIT_SHIFT and B3_SPLIT_CHUNKS in kernels/blake3.cu.
_B3_PIECE: Final = 128 * 1024
_B3_PIECE_THREADS: Final = 128
_DIRECT_COPY_LIMIT: Final = 1 << 20  # below this, one plain copy beats staging
#: allocate_progressive makes an ordinary allocation at or below this size (see
#: CudaBackend.progressive_min_size); README: "a restored shard larger than 64 MiB".
PROGRESSIVE_MIN_SIZE: Final = 64 << 20
_SOURCES: Final = {SHA256_TREE_V1: "sha256_tree", BLAKE3: "blake3"}
_TREE_NAME: Final = SHA256_TREE_V1.encode("ascii")
_LOW_OCCUPANCY_SPEEDUP: Final = 1.065
#: Side streams over which a verified migration spreads its chunks' unit kernels. On one
#: stream, chunk k+1's kernel (64 blocks, one per 1 MiB unit) waits for chunk k's to finish, so
#: at most 64 of an H200's 132 SMs hashed while the copy ran: hashing only just kept up with a
#: 385 GB/s NVLink copy and the transfer measured 0.80 x raw. Four streams let up to four chunks'
#: kernels share the GPU.
_SIDE_STREAMS: Final = 4
#: Pinned host memory kept for reuse by later offloads (``HostPool``), by default.
_HOST_POOL_BYTES: Final = 8 << 30
#: The low lane's share of the multiprocessors for persistent kernels (nh-fast-v1's leaf kernel,
#: whose blocks each loop over many leaves and so hold their SM for the whole pass): CUDA does not
#: preempt running blocks for a stream of higher priority, so a background pass sized for the
#: whole GPU would leave an engine's kernels no SM until it ends. A quarter of the SMs scrubs, the
#: rest stays free for serving.
_LOW_SM_DIVISOR: Final = 4
_PLAN_CACHE: Final = 8  # segment-table plans kept per lane (a few models, each verified repeatedly)
#: A digest that comes again with the same addresses (a verify of the same shard, ``hash`` of
#: it, the same segment table, the tail of a seal into the same buffer) runs as one CUDA graph
#: launch (``_graphs.GraphCache``, captured on the key's third call) instead of one cuda.core call
#: per kernel and copy: each launch costs 9.2-9.6 us of host time through cuda.core on the H200's
#: host (2026-11-29), against 5.6 us for the prepacked cuLaunchKernel of 2026-11-28, and a 1 MiB
#: verify's wall time was mostly that host time. Not Final: benchmarks and tests A/B it (read
#: per call); ``bench/gpu_bench.py`` records it. On the graph path ``last_device_seconds`` also
#: spans the copy of the result (32 bytes for a verify), which is queued inside the graph.
GRAPHS: bool = True


def digest_graph_key(
    algorithm: str,
    ptr: int,
    n: int,
    want_units: bool,
    split: bool,
    b3_split: bool,
    units_kernel: str,
    scratch: int,
    result: int,
    *,
    tail_only: bool = False,
) -> tuple[object, ...]:
    """The ``GraphCache`` key of a single-segment digest's device work (``_HashJob``): everything
    the queued kernels and copies depend on. The data's address and length; the algorithm, unit
    digests or not, and the kernel choice (the split flags and the unit kernel, which is how
    ``split_max_units``, ``blake3_split_max_units`` and the occupancy pick reach the launches:
    the same flags give the same launches whatever the thresholds); the scratch base (the whole
    scratch layout follows from the above and it); the pinned result buffer's address.
    ``tail_only``: the seal path's graph, of the join, reduction and copies after its unit
    kernels. The first element tags the kind, so these keys never meet the nh-fast tables'
    (``_nh_fast._queue_and_wait``) in the compute lane's cache. No key material: single-segment
    digests are unkeyed (keyed BLAKE3 runs as a segment table)."""
    kind = "seal-tail" if tail_only else "digest"
    return (kind, algorithm, ptr, n, want_units, split, b3_split, units_kernel, scratch, result)


def device_count() -> int:
    """Number of CUDA devices visible to this process (ConfigError when there is no driver)."""
    _driver.init()
    return int(check(driver().cuDeviceGetCount(), "cuDeviceGetCount"))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pointer_info(ptr: int) -> tuple[int, bool, int, int, int]:
    """(memory type, managed, device ordinal, allocation start, allocation size) of an address.
    Call it with the asking backend's context current (``CudaBackend._activate``): with several
    GPUs, an attribute query made under another device's context is answered for that context.
    An attribute CUDA leaves unset reads as -1 for the ordinal (never 0, which is a real device:
    an unknown ordinal must fail the device check, not pass it on device 0).

    cuPointerGetAttributes answers for any address, with memory type 0 for memory CUDA does not
    know (ordinary pageable memory), where cuPointerGetAttribute would report an API error.
    """
    drv = driver()
    attr = drv.CUpointer_attribute
    which = [
        attr.CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        attr.CU_POINTER_ATTRIBUTE_IS_MANAGED,
        attr.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        attr.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        attr.CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ]
    values = check(drv.cuPointerGetAttributes(len(which), which, ptr), "cuPointerGetAttributes")

    def num(v: Any) -> int:
        try:
            return int(v)
        except (TypeError, ValueError):  # an attribute CUDA left unset for unknown memory
            return 0

    mtype, managed, raw_ordinal, start, length = values
    try:
        ordinal = int(raw_ordinal)
    except (TypeError, ValueError):
        ordinal = -1
    if num(mtype) == int(drv.CUmemorytype.CU_MEMORYTYPE_DEVICE):
        ordinal = _device_ordinal(ptr, ordinal)
    return num(mtype), bool(num(managed)), ordinal, num(start), num(length)


_libcuda: ctypes.CDLL | None = None


def _device_ordinal(ptr: int, fallback: int) -> int:
    """CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL read straight from libcuda.

    Why not cuda-bindings: its attribute helper writes this attribute into a signed field and reads
    it back from an unsigned one, so every pointer reports device 0 (NVIDIA/cuda-python issue
    #2928, seen here on cuda-bindings 13.3.1 with two H200s: memory on device 1 read as device 0).
    That made the VRAM-only policy refuse every allocation on device 1, and could let memory of
    device 0 pass a check on another device. The driver's own answer is one C call away."""
    global _libcuda
    if _libcuda is None:
        try:
            _libcuda = ctypes.CDLL("libcuda.so.1")
        except OSError:  # not Linux, or the driver library under another name: keep the bindings'
            return fallback
    value = ctypes.c_int(-1)
    rc = _libcuda.cuPointerGetAttribute(
        ctypes.byref(value),
        ctypes.c_int(int(driver().CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)),
        ctypes.c_ulonglong(ptr),
    )
    return int(value.value) if rc == 0 else -1


class CudaBuffer(DeviceBuffer):
    """An exact allocation in VRAM (or, when adopted, someone else's device memory).

    Owned buffers are zeroed and freed by ``close``; adopted ones are only forgotten: their memory
    belongs to whoever allocated it (a framework tensor, say).
    """

    #: How the memory was allocated (benchmarks, tests): one ``cuMemAlloc``; ``VmmBuffer`` says
    #: ``"cuMemCreate"`` (chunks mapped into a reserved range).
    allocation_kind = "cuMemAlloc"

    def __init__(
        self, backend: CudaBackend, ptr: int, size: int, capacity: int, *, owned: bool, mem: Any = None
    ) -> None:
        super().__init__(size, backend.device)
        self._backend = backend
        self._ptr = ptr
        self._capacity = capacity
        self._owned = owned
        #: The cuda.core Buffer of an owned allocation (ExactDeviceMemoryResource); None if adopted.
        self._mem = mem

    @property
    def device_pointer(self) -> int:
        """The allocation's device address, for executors that run on the sealed bytes in place
        (CuPy, DLPack consumers). Raises IntegrityViolation once the buffer is freed."""
        self._check_open()
        return self._ptr

    @property
    def adopted(self) -> bool:
        """True when the memory was adopted, not allocated, by this backend."""
        return not self._owned

    @property
    def capacity(self) -> int:
        """Bytes actually reserved: ``size`` rounded up to the 256-byte allocation granularity."""
        return self._capacity

    def _write(self, offset: int, view: memoryview) -> None:
        with self._lock:
            self.check_mapped(offset + len(view))
            self._backend._copy_in(self._ptr + offset, view)

    def _read(self, offset: int, n: int) -> bytes:
        with self._lock:
            self.check_mapped(offset + n)
            return self._backend._copy_out(self._ptr + offset, n)

    def _free(self) -> None:
        self._backend._release(self)


class VmmBuffer(CudaBuffer):
    """``CudaBackend.allocate_progressive``: plain device memory in a reserved virtual range,
    created and mapped chunk by chunk (``map_through``) through CUDA's virtual memory
    management (``_vmm.VmmRange``, which says why). The address is the reservation's start from
    the beginning; until every chunk is mapped only the mapped prefix can be written or read,
    and digests, the policy check, peers and ``device_pointer`` refuse the buffer
    (``DeviceBuffer.check_open``): nothing ever touches an unmapped address, which would fault
    the context. ``close`` zeroes every mapped byte, then unmaps and releases the chunks and
    frees the reservation."""

    allocation_kind = "cuMemCreate"

    def __init__(self, backend: CudaBackend, vmm: _vmm.VmmRange, size: int) -> None:
        super().__init__(backend, vmm.base, size, vmm.reserved, owned=True)
        self._vmm = vmm

    @property
    def mapped(self) -> int:
        return min(self._vmm.mapped, self._size)

    @property
    def chunk_count(self) -> int:
        """Chunks mapped so far (each its own cuMemCreate)."""
        return self._vmm.chunk_count

    @property
    def map_seconds(self) -> float:
        """Host seconds spent creating and mapping chunks (benchmarks: the time the copy hid)."""
        return self._vmm.map_seconds

    @property
    def chunk_log(self) -> list[_vmm.ChunkTiming]:
        """Each mapped chunk's size and the host seconds of its driver calls (benchmarks)."""
        return list(self._vmm.chunk_log)

    def _map_more(self, end: int) -> None:
        try:
            self._vmm.map_through(end)
        except _vmm.ChunkAllocationFailed as exc:
            # The range released every chunk before raising: the same retriable errors as
            # allocate, InsufficientVram for out of memory, with nothing left allocated.
            if exc.name == OUT_OF_MEMORY:
                raise InsufficientVram(
                    self._size,
                    self._backend.mem_info()[0],
                    f"insufficient VRAM at chunk {exc.chunk} of a progressive allocation of "
                    f"{self._size} bytes; every chunk released",
                ) from exc
            raise


def _one_copy_seal(buf: DeviceBuffer, n: int, staging_bytes: int) -> bool:
    """Whether ``write_and_hash`` may queue its ``n`` bytes into ``buf`` as one copy
    (``_seal_one_copy``, for a source that needs no staging): at most the staging size, and
    only into memory mapped through ``n``. That path maps nothing: a progressive buffer still
    being mapped (a restore) goes through ``_copy_in``'s ``prepare`` instead, since one copy
    into its unmapped range faults the context."""
    return 0 < n <= staging_bytes and buf.mapped >= n


def _copy_steps(n: int, step: int, prepare: Callable[[int], int] | None) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each copy ``_copy_in`` queues for ``n`` bytes: at most ``step``
    bytes, and, with ``prepare``, never past the end it returns for the copy's offset. A
    generator on purpose: ``prepare`` for the next copy runs only once the previous copy is
    queued, so a progressive buffer creates chunk k+1 while the copy engine moves chunk k."""
    off = 0
    while off < n:
        m = min(step, n - off)
        if prepare is not None:
            ready = prepare(off)
            if ready <= off:
                raise IntegrityViolation(f"destination not ready at byte {off} of the copy")
            m = min(m, ready - off)
        yield off, m
        off += m


# -- stream and event helpers (cuda.core, errors mapped to ours) ---------------------------------


# record, stream_wait, event_sync and elapsed_seconds live in _core (imported above under the
# names this module has always used), shared with the _nh_fast launcher.


def _event(dev: Any, *, timing: bool, blocking: bool = False) -> Any:
    """A cuda.core event; ``blocking``: created with blocking synchronization (a thread waiting
    on it sleeps in the driver until the GPU signals, instead of spinning on a core)."""
    with core_errors("cuEventCreate"):
        return dev.create_event(options=core().EventOptions(timing_enabled=timing, blocking_sync=blocking))


def _stream(dev: Any, priority: int | None) -> Any:
    """A non-blocking stream. ``priority=0`` is what cuStreamCreate gives (CUDA's default
    priority); None is cuda.core's default, the least priority of the context's range (what
    cuCtxGetStreamPriorityRange calls least; 0 on current GPUs too)."""
    with core_errors("cuStreamCreate"):
        return dev.create_stream(options=core().StreamOptions(nonblocking=True, priority=priority))


# -- migration, offload and restore copies (issue 13) -------------------------------------------
#
# Between two GPUs the bytes go peer to peer (cuMemcpyPeerAsync after cuCtxEnablePeerAccess) where
# cuDeviceCanAccessPeer allows it, and otherwise through two pinned host buffers in turn. Every
# driver call below runs with the context of the backend whose stream or memory it uses current
# (its _activate()): driver calls act on the calling thread's current context.
#
# cuda-bindings for peer access and the copies: cuda.core 1.2 manages peer access only for its own
# memory pools (DeviceMemoryResource), not between the primary contexts our exact allocations live
# in, and its copies take whole Buffers, where ours are byte ranges at offsets.


#: Host memory at least this large is zeroed by several threads at once (``_zero_host``).
_PARALLEL_ZERO_MIN: Final = 64 << 20


def _zero_host(address: int, size: int) -> None:
    """Zero ``size`` bytes at ``address``. Large offload copies (GiBs) are zeroed by several
    threads in 64 MiB pieces: one thread's memset runs at ~10 GB/s, which made the discard of a
    restored shard's pinned copy the slowest step of a restore. ``ctypes.memset`` is a foreign
    call, so the GIL is released while each piece is written."""
    if size < _PARALLEL_ZERO_MIN:
        ctypes.memset(address, 0, size)
        return
    step = _PARALLEL_ZERO_MIN
    try:
        with ThreadPoolExecutor(max_workers=min(8, default_copy_threads() * 2, -(-size // step))) as pool:
            futures = [
                pool.submit(ctypes.memset, address + off, 0, min(step, size - off))
                for off in range(0, size, step)
            ]
            for f in futures:
                f.result()
    except RuntimeError:
        # No thread could be started (interpreter shutdown, a thread limit): the caller would
        # free or pool the memory with the model's bytes still in it. Zero it all here instead.
        ctypes.memset(address, 0, size)


class PinnedHostMemory(HostMemory):
    """Page-locked host memory for offloads and restores: the copy engines reach it directly.

    ``size`` bytes of ``buf`` (which may be larger: a buffer reused from the backend's
    ``HostPool``). ``close`` zeroes those bytes and hands the buffer back to ``pool`` (None:
    frees it). It may run on another thread than the one that allocated it (a restore hands its
    offloaded copy to a background discard): freeing makes the owning device current first."""

    def __init__(
        self, size: int, dev: Any, buf: PinnedHostBuffer, pool: HostPool[PinnedHostBuffer] | None = None
    ) -> None:
        if not 0 < size <= buf.size:
            raise InvalidInput("pinned host memory size out of range of its buffer")
        self._dev = dev
        self._size = size
        self._pool = pool
        self._announced = False
        self._buf: PinnedHostBuffer | None = buf

    def closing_soon(self) -> None:
        # Announced to the pool now, on the restoring thread: an offload that starts before the
        # background discard has even begun still waits for this buffer.
        if self._buf is not None and self._pool is not None and not self._announced:
            self._announced = True
            self._pool.returning(self._buf)

    @property
    def view(self) -> memoryview:
        if self._buf is None:
            raise IntegrityViolation("pinned host memory used after it was released")
        return self._buf.view[: self._size]

    @property
    def address(self) -> int:
        if self._buf is None:
            raise IntegrityViolation("pinned host memory used after it was released")
        return self._buf.address

    def close(self) -> None:
        if self._buf is not None:
            buf, self._buf = self._buf, None
            # Offloaded model bytes do not linger, in freed pages or in pooled ones. Only the
            # first ``size`` bytes were reachable through ``view``; the rest of a pooled buffer
            # was zeroed when its earlier user closed it (fresh pinned pages are zero).
            pool = self._pool
            if pool is None:
                _zero_host(buf.address, self._size)
                _free_pinned(self._dev, buf)
                return
            if not self._announced:
                pool.returning(buf)  # an offload asking meanwhile waits for this buffer
            try:
                _zero_host(buf.address, self._size)
            except BaseException:
                pool.cancel(buf)
                _free_pinned(self._dev, buf)
                raise
            pool.give(buf)


def _free_pinned(dev: Any, buf: PinnedHostBuffer) -> None:
    with core_errors("cuCtxSetCurrent"):
        dev.set_current()
    buf.close()


def _own_buffer(backend: CudaBackend, buf: DeviceBuffer) -> CudaBuffer:
    if not isinstance(buf, CudaBuffer) or buf._backend is not backend:
        raise InvalidInput("buffer does not belong to this CUDA backend")
    buf.check_open()
    return buf


def _peer_allocate_host(self: CudaBackend, size: int) -> HostMemory:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidInput("host memory size must be a positive integer")
    self._activate()
    # A released offload copy of a fitting size first: page-locking GiBs anew is what made
    # offload slow (HostPool says why).
    buf = self._host_pool.take(size)
    if buf is None:
        buf = PinnedHostBuffer(size, self._dev)
    return PinnedHostMemory(size, self._dev, buf, self._host_pool)


def _peer_read_into(self: CudaBackend, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
    cbuf = _own_buffer(self, buf)
    out = out.cast("B") if out.format != "B" else out
    n = len(out)
    check_range(cbuf.size, offset, n)
    if not n:
        return
    addr, _keep = host_address(out)
    with cbuf._lock:
        cbuf.check_open()
        self._activate()
        check(
            driver().cuMemcpyDtoHAsync(addr, cbuf._ptr + offset, n, self._copy_stream.handle),
            "cuMemcpyDtoHAsync",
        )
        self._sync(self._copy_stream, "device-to-host copy")


def _peer_read_chunks(
    self: CudaBackend, buf: DeviceBuffer, out: memoryview, on_chunk: Callable[[int, int], None] | None = None
) -> None:
    """Every chunk's device-to-host copy is queued at once on the copy stream, with an event
    after each; ``on_chunk`` runs for chunk k as soon as its event completes, while chunks k+1...
    are still copying. (The former offload copied one chunk, synchronized, hashed it on the CPU,
    and only then copied the next: copy and hash time added up.)"""
    cbuf = _own_buffer(self, buf)
    out = out.cast("B") if out.format != "B" else out
    n = len(out)
    check_range(cbuf.size, 0, n)
    if not n:
        return
    addr, _keep = host_address(out)
    drv = driver()
    chunks = [(off, min(COPY_CHUNK, n - off)) for off in range(0, n, COPY_CHUNK)]
    events: list[Any] = []
    with cbuf._lock:
        cbuf.check_open()
        self._activate()
        try:
            for off, m in chunks:
                check(
                    drv.cuMemcpyDtoHAsync(addr + off, cbuf._ptr + off, m, self._copy_stream.handle),
                    "cuMemcpyDtoHAsync",
                )
                events.append(_event(self._dev, timing=False))
                _record(self._copy_stream, events[-1])
            for (off, m), ev in zip(chunks, events, strict=True):
                _event_sync(ev, "device-to-host copy")
                if on_chunk is not None:
                    on_chunk(off, m)
        finally:
            # Nothing may still be writing into ``out`` once we return or raise.
            self._activate()
            with contextlib.suppress(Exception):  # the error being raised, if any, matters more
                self._copy_stream.sync()
            for ev in events:
                with contextlib.suppress(Exception):
                    ev.close()


def _peer_can_access_peer(self: CudaBackend, other: Backend) -> bool:
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
        self.peer = self.same or _peer_can_access_peer(db, sb)
        self.stage: list[tuple[PinnedHostBuffer, Any]] = []
        #: Copies queued on ``db``'s copy stream since the last :meth:`wait` (see :meth:`close`).
        self.pending = False
        if self.peer and not self.same:
            _enable_peer(db, sb)
            # Peer access to VMM memory (a restored shard) is granted per mapping, not by
            # cuCtxEnablePeerAccess: give the other device access to whichever side is VMM.
            if isinstance(src, VmmBuffer):
                src._vmm.allow(db.device)
            if isinstance(dst, VmmBuffer):
                dst._vmm.allow(sb.device)
            db._activate()  # allow() made its own device's context current

    def issue(self, offset: int, length: int) -> None:
        drv = driver()
        db, sb = self.db, self.sb
        d, s = self.dst._ptr + offset, self.src._ptr + offset
        # Set before queuing: whatever this call queues must be waited for by close().
        self.pending = True
        if self.same:
            db._activate()
            check(drv.cuMemcpyDtoDAsync(d, s, length, db._copy_stream.handle), "cuMemcpyDtoDAsync")
            return
        if self.peer:
            db._activate()
            check(
                drv.cuMemcpyPeerAsync(d, db._ctx, s, sb._ctx, length, db._copy_stream.handle),
                "cuMemcpyPeerAsync",
            )
            return
        # No peer access: device to host on the source, host to device on the destination, two
        # pinned buffers in turn so that one is read back while the other is written.
        if not self.stage:
            db._activate()
            for _ in range(2):
                pinned = PinnedHostBuffer(COPY_CHUNK, db._dev)
                self.stage.append((pinned, _event(db._dev, timing=False)))
        for i, off in enumerate(range(0, length, COPY_CHUNK)):
            m = min(COPY_CHUNK, length - off)
            pinned, done = self.stage[i % 2]
            db._activate()
            _event_sync(done, "waiting for a staging buffer")
            sb._activate()
            check(
                drv.cuMemcpyDtoHAsync(pinned.address, s + off, m, sb._copy_stream.handle), "cuMemcpyDtoHAsync"
            )
            sb._sync(sb._copy_stream, "device-to-host copy (staged migration)")
            db._activate()
            check(
                drv.cuMemcpyHtoDAsync(d + off, pinned.address, m, db._copy_stream.handle), "cuMemcpyHtoDAsync"
            )
            _record(db._copy_stream, done)

    def wait(self) -> None:
        self.db._activate()
        self.db._sync(self.db._copy_stream, "migration copy")
        self.pending = False

    def close(self) -> None:
        if self.pending and not self.stage:
            # A failure (or an interrupt) after some chunks' peer or device-to-device copies were
            # queued: the callers release both buffers' locks right after, and neither buffer's
            # free waits for this copy stream (a cuMemAlloc buffer is zeroed on its own
            # backend's compute stream, a VMM range waits for its own backend's streams), so a
            # late copy would read freed (or unmapped) memory, or write into memory already
            # zeroed and freed. A broken context fails this too, and then nothing is in flight.
            with contextlib.suppress(Exception):
                self.db._activate()
                self.db._copy_stream.sync()
            self.pending = False
        if self.stage:
            self.db._activate()
            self.db._sync(self.db._copy_stream, "migration copy")
            for pinned, ev in self.stage:
                pinned.close()
                ev.close()
            self.stage.clear()


def _peer_pair(
    self: CudaBackend, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, offset: int, length: int
) -> tuple[CudaBuffer, CudaBackend, CudaBuffer]:
    assert isinstance(src_backend, CudaBackend)
    cdst = _own_buffer(self, dst)
    csrc = _own_buffer(src_backend, src)
    if cdst is csrc:
        raise InvalidInput("source and destination are the same buffer")
    check_range(csrc.size, offset, length)
    check_range(cdst.size, offset, length)
    return cdst, src_backend, csrc


def _peer_copy_from(
    self: CudaBackend, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, offset: int, length: int
) -> None:
    if not isinstance(src_backend, CudaBackend):
        Backend.copy_from(self, dst, src_backend, src, offset, length)
        return
    cdst, sb, csrc = _peer_pair(self, dst, src_backend, src, offset, length)
    if not length:
        return
    with cdst._lock, csrc._lock:
        cdst.check_open()
        csrc.check_open()
        mover = _Mover(self, cdst, sb, csrc)
        try:
            mover.issue(offset, length)
            mover.wait()
        finally:
            mover.close()


def _peer_copy_and_hash_from(
    self: CudaBackend,
    dst: DeviceBuffer,
    src_backend: Backend,
    src: DeviceBuffer,
    length: int,
    algorithm: str,
    *,
    on_landed: LandedHook | None = None,
    key: bytes | None = None,
) -> HashResult:
    if not isinstance(src_backend, CudaBackend) or key is not None or algorithm == NH_FAST_V1:
        # Keyed digests (nh-fast-v1) have no overlapped peer path: copy (peer to peer where the
        # devices allow it), then one keyed digest of what landed.
        return Backend.copy_and_hash_from(
            self, dst, src_backend, src, length, algorithm, on_landed=on_landed, key=key
        )
    algorithm = check_algorithm(algorithm)
    cdst, sb, csrc = _peer_pair(self, dst, src_backend, src, 0, length)
    # The source stays locked for the whole copy (nobody frees it underneath); the destination is
    # locked too, except while a fault-injection hook runs (it writes through the buffer's API).
    with csrc._lock, self._lock:
        csrc.check_open()
        cdst._lock.acquire()
        try:
            cdst.check_open()
            mover = _Mover(self, cdst, sb, csrc)
            sides: list[tuple[Any, Any]] = []
            used: set[int] = set()
            ok = False
            try:
                self._activate()
                job = _HashJob(self, algorithm, cdst._ptr, length, True)
                sides = self._side_streams()
                # The side streams start after whatever the compute stream holds (the job's
                # start event; earlier work on the same scratch).
                for stream, ev in sides:
                    _record(self._stream, ev)
                    _stream_wait(stream, ev)
                launched = 0
                for i, off in enumerate(range(0, length, COPY_CHUNK)):
                    m = min(COPY_CHUNK, length - off)
                    mover.issue(off, m)
                    if on_landed is not None:
                        mover.wait()
                        cdst._lock.release()
                        try:
                            on_landed(cdst, off, m)
                        finally:
                            cdst._lock.acquire()
                        cdst.check_open()
                    ready = job.units if off + m >= length else (off + m) // UNIT_SIZE
                    if ready > launched:
                        self._activate()
                        side = i % len(sides)
                        stream = sides[side][0]
                        _record(self._copy_stream, self._xfer_event)
                        _stream_wait(stream, self._xfer_event)
                        job.launch_units(launched, ready, stream)
                        used.add(side)
                        launched = ready
                self._activate()
                if launched < job.units:
                    # (Only when length == 0: the last chunk launches every remaining unit.)
                    _record(self._copy_stream, self._xfer_event)
                    _stream_wait(self._stream, self._xfer_event)
                    job.launch_units(launched, job.units)
                # Join: the reduction on the compute stream waits for every side stream's kernels.
                for side in sorted(used):
                    stream, ev = sides[side]
                    _record(stream, ev)
                    _stream_wait(self._stream, ev)
                result = job.finish()[1]
                mover.wait()
                ok = True
            finally:
                if not ok:
                    # A failure mid-way: no kernel or copy may still touch the destination when
                    # the caller frees it (its zeroing runs on the compute stream only).
                    with contextlib.suppress(Exception):
                        self._activate()
                        for stream, _ev in sides:
                            stream.sync()
                        self._copy_stream.sync()
                        self._stream.sync()
                mover.close()
        finally:
            cdst._lock.release()
    if result is None:  # pragma: no cover - the job was built with units
        raise IntegrityViolation("digest kernels returned no unit digests")
    return result


def _peer_peer_copy_raw(
    self: CudaBackend, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, length: int
) -> None:
    """The plain copy with nothing verified, in the same chunks as ``copy_and_hash_from``: the
    baseline a benchmark measures verified migration against."""
    cdst, sb, csrc = _peer_pair(self, dst, src_backend, src, 0, length)
    with cdst._lock, csrc._lock:
        mover = _Mover(self, cdst, sb, csrc)
        try:
            for off in range(0, length, COPY_CHUNK):
                mover.issue(off, min(COPY_CHUNK, length - off))
            mover.wait()
        finally:
            mover.close()


class KernelSession:
    """The backend's compute lane, as kernel launchers in other modules of this package
    (``_nh_fast``) see it: the stream, timing events, scratch, result buffer, modules and
    occupancy cache that the backend's own digests (``_HashJob``) use, behind public names, so
    that no module reads the backend's private members (tests/test_import_graph.py).

    Made only by :meth:`CudaBackend.kernel_session`, which holds the backend's lock with the
    device current for its ``with`` block. Using the session after the block raises
    IntegrityViolation: by then another thread may own the stream, the scratch and the events.

    ``stream`` is a cuda.core ``Stream`` (``.handle`` for cuda-bindings copies); ``t0`` and
    ``t1`` are timing ``Event``s (``t1 - t0`` is milliseconds; ``_core.elapsed_seconds``).
    """

    def __init__(self, backend: CudaBackend, lane: _Lane | None = None) -> None:
        self._b = backend
        #: The low-priority lane (background verification), or None: the compute lane.
        self._lane = lane
        if lane is None:
            self._stream, self._t0, self._t1 = backend._stream, backend._t0, backend._t1
            self._multiprocessors = backend.multiprocessors
            self._scratch: Callable[[int], int] = backend._scratch
            self._results: Callable[[int], PinnedHostBuffer] = backend._result_buffer
            self._graphs = backend._graphs
        else:
            self._stream, self._t0, self._t1 = lane.stream, lane.t0, lane.t1
            self._multiprocessors = max(1, backend.multiprocessors // _LOW_SM_DIVISOR)
            self._scratch, self._results = lane.arena, lane._pinned
            self._graphs = lane.graphs
        self._open = True

    def _backend(self) -> CudaBackend:
        if not self._open:
            raise IntegrityViolation("a CUDA kernel session was used after its with block")
        return self._b

    @property
    def stream(self) -> Any:
        """The session's stream (cuda.core ``Stream``): the compute stream ``hash`` and ``digest``
        run on, or the low lane's stream of the least priority."""
        self._backend()
        return self._stream

    @property
    def t0(self) -> Any:
        """Timing event recorded before the kernels (cuda.core ``Event``)."""
        self._backend()
        return self._t0

    @property
    def t1(self) -> Any:
        """Timing event recorded after the kernels (cuda.core ``Event``)."""
        self._backend()
        return self._t1

    @property
    def graphs(self) -> GraphCache:
        """The lane's CUDA graphs of repeated calls (``_graphs.GraphCache``), used under the
        session's lock like the stream they launch on."""
        self._backend()
        return self._graphs

    @property
    def multiprocessors(self) -> int:
        """The multiprocessors a persistent kernel of this session should fill: all of them, or
        on the low lane a share of them (``_LOW_SM_DIVISOR``)."""
        self._backend()
        return self._multiprocessors

    def wait(self) -> None:
        """Wait for everything queued on the session's stream: a synchronization, or on the low
        lane a wait that holds no GIL and no core (``LOW_WAIT``)."""
        b = self._backend()
        if self._lane is None:
            b._sync(self._stream, "nh-fast-v1 kernels")
        else:
            self._lane._wait()

    def module(self, source: str) -> Module:
        """The loaded kernel module of ``source`` (a name of ``_compile.KERNELS``), compiled once
        with the backend's ``kernel_defines`` for it and kept with its other modules."""
        return self._backend()._source_module(source)

    def kernel_defines(self, source: str) -> Mapping[str, str]:
        """The extra preprocessor definitions the backend compiles ``source`` with (a copy)."""
        return dict(self._backend()._kernel_defines.get(source, {}))

    def blocks_per_sm(self, mod: Module, name: str, threads: int) -> int:
        """Resident blocks per multiprocessor (at least 1) of kernel ``name`` of ``mod`` at
        ``threads`` threads per block, asked of the driver once per backend."""
        return self._backend()._blocks_per_sm(mod, name, threads)

    def scratch(self, nbytes: int) -> int:
        """Device address of at least ``nbytes`` bytes of the lane's digest scratch (the backend's
        scratch, or the low lane's arena; zeroed when allocated and freed, not between uses; grown,
        never shrunk), the session's to use until the block ends."""
        self._backend()
        return self._scratch(nbytes)

    def result_buffer(self, nbytes: int) -> PinnedHostBuffer:
        """The lane's pinned result buffer, at least ``nbytes`` bytes (grown, never shrunk)."""
        self._backend()
        return self._results(nbytes)

    @contextlib.contextmanager
    def temporary(self, nbytes: int) -> Iterator[int]:
        """Device address of an allocation of its own (``nbytes`` rounded up to 256, zero-filled)
        for the ``with`` block, freed after it: large test inputs that must not grow the
        scratch, which is kept for the backend's life."""
        mr = self._backend()._scratch_mr
        try:
            mem = mr.allocate(max(256, -(-nbytes // 256) * 256))
        except CuMemAllocFailed as exc:
            raise _driver.map_name(exc.name, "cuMemAlloc") from exc
        try:
            yield int(mem.handle)
        finally:
            with contextlib.suppress(Exception):  # as for sha256_messages: not reported
                mr.free(mem)

    def copy_out(self, src: int, n: int) -> bytes:
        """``n`` bytes at device address ``src``, copied to the host (on the copy stream)."""
        return self._backend()._copy_out(src, n)


class CudaBackend(Backend):
    """Device memory on one CUDA device, through NVIDIA's cuda.core (and cuda-bindings where
    cuda.core has no API) and NVRTC.

    Options: ``allow_integrated`` accepts integrated GPUs, whose memory is host memory (refused by
    default); ``staging_bytes`` and ``staging_buffers`` bound the pinned staging pool (2 x 64 MiB);
    ``copy_threads`` host threads fill staging buffers from pageable memory; ``kernel_defines``
    maps a kernel source (``"sha256_tree"``, ``"blake3"``) to extra preprocessor definitions, for
    tuning runs only; ``host_pool_bytes`` bounds the pinned host memory that restored shards'
    offload copies leave behind, zeroed, for later offloads to reuse (default 8 GiB; 0: every
    offload page-locks new memory and every restore frees it, as before).
    """

    name = "cuda"
    capabilities = Capabilities(
        emulated=False,
        host_view=False,
        device_pointer=True,
        adopt_host=False,
        adopt_pointer=True,
        batched_digests=True,
        priority_streams=True,
        progressive_allocation=True,
    )
    # Migration, offload and restore copies (peer to peer where allowed): see _peer.py.
    allocate_host, read_into, can_access_peer = _peer_allocate_host, _peer_read_into, _peer_can_access_peer
    read_chunks = _peer_read_chunks
    copy_from, copy_and_hash_from = _peer_copy_from, _peer_copy_and_hash_from
    peer_copy_raw = _peer_peer_copy_raw

    def __init__(
        self,
        device: int = 0,
        *,
        allow_integrated: bool = False,
        staging_bytes: int = 64 << 20,
        staging_buffers: int = 2,
        copy_threads: int | None = None,
        kernel_defines: Mapping[str, Mapping[str, str]] | None = None,
        host_pool_bytes: int = _HOST_POOL_BYTES,
    ) -> None:
        if not _is_int(device) or device < 0:
            raise ConfigError(f"CUDA device must be a non-negative integer, not {device!r}")
        if not _is_int(staging_bytes) or staging_bytes < UNIT_SIZE or staging_bytes % UNIT_SIZE:
            raise ConfigError("staging_bytes must be a positive multiple of 1 MiB")
        if not _is_int(staging_buffers) or not 1 <= staging_buffers <= 8:
            raise ConfigError("staging_buffers must be between 1 and 8")
        if not _is_int(host_pool_bytes) or host_pool_bytes < 0:
            raise ConfigError("host_pool_bytes must be a non-negative integer")
        count = device_count()
        if count == 0:
            raise request_error("no CUDA GPU is visible to this process")
        if device >= count:
            raise request_error(f"device {device} does not exist ({count} CUDA device(s) visible)")
        super().__init__(device)
        drv = driver()
        self._closed = False
        #: Set by close() before it closes the lanes (``_activate`` refuses from then on).
        self._closing = False
        self._allow_integrated = bool(allow_integrated)
        # cuda.core's Device: set_current() retains the device's primary context and makes it
        # current (cuDevicePrimaryCtxRetain + cuCtxSetCurrent, as before); cuda.core keeps that
        # retain for the process.
        self._dev = _core.device(device)
        self._activate()
        # cuda-bindings: the CUdevice and CUcontext handles, for the calls cuda.core has no API
        # for (peer access between contexts, total memory). The current context is the primary
        # context set_current() just made current.
        self._cudev = check(drv.cuDeviceGet(device), "cuDeviceGet")
        self._ctx = check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        with core_errors("querying the CUDA device"):
            props = self._dev.properties
            self.device_name = str(self._dev.name)
            major, minor = int(props.compute_capability_major), int(props.compute_capability_minor)
            self.integrated = bool(props.integrated)
            self.multiprocessors = int(props.multiprocessor_count)
        self.compute_capability = (major, minor)
        self.arch = f"sm_{major}{minor}"
        # cuda-bindings: cuda.core 1.2's DeviceProperties has no total memory.
        self.total_memory = int(check(drv.cuDeviceTotalMem(self._cudev), "cuDeviceTotalMem"))
        # Two non-blocking streams of CUDA's default priority, as cuStreamCreate made them:
        # kernels (and the normal lane), copies.
        self._stream = _stream(self._dev, 0)
        self._copy_stream = _stream(self._dev, 0)
        self._xfer_event = _event(self._dev, timing=False)
        self._t0 = _event(self._dev, timing=True)
        self._t1 = _event(self._dev, timing=True)
        # Exact allocations (zero-filled, zeroed before free), zeroing on the compute stream, for
        # buffers and for scratch space alike. Scratch holds no sealed bytes, but it does hold
        # key material: nh-fast-v1 shard keys and keyed-BLAKE3 key records (derived from the
        # worker token) are uploaded there, and freed unzeroed they would be readable by the
        # next allocation in the process (torch's allocator, say). Scratch is freed only when it
        # grows and at close, so the zeroing costs nothing per digest.
        self._mr = _core.exact_resource(self._dev, self._stream, zero=True)
        self._scratch_mr = _core.exact_resource(self._dev, self._stream, zero=True)
        self._kernel_defines = {k: dict(v) for k, v in (kernel_defines or {}).items()}
        self._modules: dict[str, Module] = {}
        self._staging_bytes = staging_bytes
        self._staging_count = staging_buffers
        self._staging: list[tuple[PinnedHostBuffer, Any]] = []
        dev = self._dev
        # Released offload copies (pinned, zeroed), reused by allocate_host; freed at close.
        self._host_pool: HostPool[PinnedHostBuffer] = HostPool(
            host_pool_bytes, lambda b: _free_pinned(dev, b)
        )
        self._copy_threads = copy_threads or default_copy_threads()
        self._copy_pool: ThreadPoolExecutor | None = None
        self._scratch_ptr = 0
        self._scratch_size = 0
        self._scratch_mem: Any = None
        self._results: PinnedHostBuffer | None = None
        self._lock = threading.RLock()  # kernels, scratch and result buffers
        self._staging_lock = threading.Lock()
        self._live: weakref.WeakSet[CudaBuffer] = weakref.WeakSet()
        #: Guards _live: buffers are added and dropped on any thread, and close() iterates it
        #: (a WeakSet is iterated by Python code: an add meanwhile fails the iteration).
        self._live_lock = threading.Lock()
        # Pinned buffers handed out by pinned_host_buffer (see _is_pinned).
        self._own_pinned: weakref.WeakSet[PinnedHostBuffer] = weakref.WeakSet()
        #: Guards _own_pinned: added to on any thread, scanned by _is_pinned.
        self._own_pinned_lock = threading.Lock()
        #: allocate_progressive: the chunk schedule (``progressive_chunks``: the first chunk,
        #: doubling up to the cap, each rounded to the VMM granularity), and the size at or
        #: below which an ordinary allocation is made instead (a few chunks' driver calls would
        #: cost about what one cuMemAlloc of that size does, and small shards would each hold
        #: a 2 MiB granule of their own). Benchmarks set the last to a shard's size for the
        #: plain path in the same run.
        self.progressive_first_chunk = PROGRESSIVE_FIRST_CHUNK
        self.progressive_max_chunk = PROGRESSIVE_MAX_CHUNK
        self.progressive_min_size = PROGRESSIVE_MIN_SIZE
        self._vmm_ok: bool | None = None
        #: Device time of the last hash's kernels in seconds (CUDA events), for benchmarks.
        self.last_device_seconds = 0.0
        #: sha256-tree-v1 shards of at most this many units run eight blocks per unit (see
        #: sha256_tree_units_split): one block per unit would leave most SMs idle.
        self.split_max_units = max(1, self.multiprocessors // 2)
        #: blake3 digests (verify) of shards of at most this many units, and the digest of a
        #: one-unit shard however it is asked for, run one block per 128 KiB piece with one chunk
        #: per thread (blake3_units_split) instead of one block per 1 MiB unit with four chunks
        #: per thread in series. Up to SMs/2 units the unit kernel has at most half the SMs busy
        #: with one 256-thread block each, and the split runs eight times the blocks over every
        #: SM, each thread's serial chain a quarter as long. Above that the unit kernel's blocks
        #: cover most SMs already, four resident per SM under its 64-register cap (the split
        #: kernel uses 88 registers), so splitting adds no parallelism and only more nodes to
        #: reduce. SMs/2 is where sha256-tree-v1's split stops (split_max_units); the blake3
        #: crossover itself is the benchmark's to measure (tests force this attribute both ways).
        self.blake3_split_max_units = max(1, self.multiprocessors // 2)
        #: Scratch bytes (VRAM) the last hash needed, and the unit kernel it ran (benchmarks).
        self.last_scratch_bytes = 0
        self.last_units_kernel = ""
        #: Resident blocks per SM of (kernel, threads per block), asked once each.
        self._occupancy: dict[tuple[str, int], int] = {}
        # Side streams for the unit kernels of a verified migration (_peer_copy_and_hash_from),
        # created on first use and kept: (stream, event) pairs.
        self._sides: list[tuple[Any, Any]] = []
        # Segment-table digests: the normal lane shares the compute stream and lock with the
        # single-segment path; the low lane (scrubbing) has its own, created on first use.
        self._lanes: dict[str, _Lane] = {}
        #: CUDA graphs of repeated calls on the compute stream (nh-fast tables, single-segment
        #: digests, seal tails, segment tables; ``GRAPHS``), captured on a stream of their own at
        #: the compute stream's priority: the memory resource zeroes allocations and frees on the
        #: compute stream outside the backend's lock, and that work must never fall into a
        #: capture (``_graphs.GraphCache``). 64 graphs rather than the default 16: with single
        #: shards cached too, a store of a few dozen shards verified one by one would otherwise
        #: cycle through more keys than the cache holds (an executable graph of a few nodes costs
        #: the driver a few KiB).
        self._capture_stream = _stream(self._dev, 0)
        self._capture_gate = _core.capture_gate(int(self._dev.device_id))
        self._graphs = GraphCache(capacity=64, capture_stream=self._capture_stream, gate=self._capture_gate)
        # The table kernels of each set of algorithms, once loaded (_table_kernels).
        self._table_fns: dict[frozenset[str], dict[tuple[str, str], Any]] = {}
        # Checked unkeyed tables by the identity of their Segment objects (_prepared_table).
        self._prepared: OrderedDict[tuple[int, int, int], _PreparedTable] = OrderedDict()
        self._prepared_lock = threading.Lock()

    # -- basics ----------------------------------------------------------------------------------

    def _activate(self) -> None:
        # Driver calls act on the calling thread's current context; callers come from any thread,
        # and with several GPUs each backend must make its own device's context current.
        if self._closing:  # (see close(): lanes' users must not run on closed lanes)
            raise ConfigError("the CUDA backend is closed")
        self._make_current()

    def _make_current(self) -> None:
        """``_activate`` without the refusal while close() runs: what frees memory (a VMM
        range's release, which zeroes it first) must still reach the device then."""
        if self._closed:
            raise ConfigError("the CUDA backend is closed")
        with core_errors("cuCtxSetCurrent"):
            self._dev.set_current()

    @contextlib.contextmanager
    def kernel_session(
        self, priority: str = "normal", *, preload: Sequence[str] = ()
    ) -> Iterator[KernelSession]:
        """A lane for this package's kernel launchers in other modules (``_nh_fast``), with the
        device current for the whole ``with`` block, as a :class:`KernelSession`. Not for
        applications: use ``hash``/``digest`` and the tables.

        ``priority="normal"``: the compute lane, holding the backend's lock (kernels, scratch,
        result buffer, module and occupancy caches). ``"low"`` (background verification): the
        low lane's stream, arena, pinned buffer and lock, so that it never waits for, or holds
        up, a foreground verify (as the low segment tables do); the kernel modules named in
        ``preload`` are loaded first under the backend's lock, which the low session then does
        not take."""
        if priority == "low":
            lane = self._lane("low")
            missing = [source for source in preload if source not in self._modules]
            if missing:  # once per backend: later low sessions never touch the backend's lock
                with self._lock:
                    self._activate()
                    for source in missing:
                        self._source_module(source)
            with lane.lock:
                self._activate()
                session = KernelSession(self, lane)
                try:
                    yield session
                finally:
                    session._open = False
            return
        if priority != "normal":
            raise InvalidInput(f"priority must be one of {PRIORITIES}, not {priority!r}")
        with self._lock:
            self._activate()
            session = KernelSession(self)
            try:
                yield session
            finally:
                session._open = False

    def _sync(self, stream: Any, what: str) -> None:
        with core_errors(what):
            stream.sync()

    def _side_streams(self) -> list[tuple[Any, Any]]:
        """``_SIDE_STREAMS`` (stream, event) pairs for concurrent unit kernels; callers hold
        ``_lock`` with the context current."""
        if not self._sides:
            for _ in range(_SIDE_STREAMS):
                stream = _stream(self._dev, 0)
                try:
                    ev = _event(self._dev, timing=False)
                except BaseException:
                    stream.close()
                    raise
                self._sides.append((stream, ev))
        return self._sides

    def describe(self) -> str:
        gib = self.total_memory / (1 << 30)
        kind = ", integrated" if self.integrated else ""
        return f"cuda: {self.device_name} (device {self.device}, {self.arch}, {gib:.0f} GiB{kind})"

    def mem_info(self) -> tuple[int, int]:
        self._activate()
        # cuda-bindings: cuda.core 1.2 has no free-memory query.
        free, total = check(driver().cuMemGetInfo(), "cuMemGetInfo")
        free, total = int(free), int(total)
        if free > total:
            raise IntegrityViolation("cuMemGetInfo reported more free memory than the total")
        return free, total

    # -- allocation ------------------------------------------------------------------------------

    def allocate(self, size: int) -> CudaBuffer:
        if not _is_int(size):
            raise InvalidInput("allocation size must be an integer")
        if size < 1:
            raise InvalidInput(f"allocation size must be at least 1 byte, not {size}")
        capacity = -(-size // ALIGNMENT) * ALIGNMENT
        self._activate()
        if capacity > self.total_memory:
            raise InsufficientVram(size, self.mem_info()[0])
        try:
            # One exact cuMemAlloc, zero-filled (a read before any write never shows earlier
            # contents): ExactDeviceMemoryResource, not cuda.core's pool.
            mem = self._mr.allocate(capacity)
        except CuMemAllocFailed as exc:
            if exc.name == OUT_OF_MEMORY:
                raise InsufficientVram(size, self.mem_info()[0]) from exc
            raise CudaAllocationFailed(f"cuMemAlloc of {capacity} bytes failed: {exc.name}") from exc
        buf = CudaBuffer(self, int(mem.handle), size, capacity, owned=True, mem=mem)
        with self._live_lock:
            self._live.add(buf)
        return buf

    def allocate_progressive(self, size: int) -> CudaBuffer:
        """``Backend.allocate_progressive``: a ``VmmBuffer`` (a reserved virtual range whose
        chunks, ``progressive_chunks`` of ``progressive_first_chunk`` doubling up to
        ``progressive_max_chunk``, are created and mapped by ``map_through``) when ``size`` is
        above ``progressive_min_size``; an ordinary ``allocate`` otherwise. Not zero-filled,
        except the rounding tail past ``size`` (the caller writes ``[0, size)``)."""
        if not _is_int(size):
            raise InvalidInput("allocation size must be an integer")
        if size < 1:
            raise InvalidInput(f"allocation size must be at least 1 byte, not {size}")
        if size <= self.progressive_min_size or not self._vmm_supported():
            return self.allocate(size)
        self._activate()
        if size > self.total_memory:
            raise InsufficientVram(size, self.mem_info()[0])
        try:
            vmm = _vmm.VmmRange(
                self.device,
                size,
                # Not _activate: the range's release (zeroing, unmapping) must work while the
                # backend closes, when _activate refuses.
                activate=self._make_current,
                copy_stream=self._copy_stream,
                zero_stream=self._stream,
                first=self.progressive_first_chunk,
                cap=self.progressive_max_chunk,
            )
        except CudaAllocationFailed as exc:
            raise InsufficientVram(size, self.mem_info()[0], f"cuMemAddressReserve failed: {exc}") from exc
        try:
            buf = VmmBuffer(self, vmm, size)
            with self._live_lock:
                self._live.add(buf)
        except BaseException:
            vmm.release()  # nothing mapped yet: frees the reservation
            raise
        return buf

    def _vmm_supported(self) -> bool:
        """Whether the device has virtual memory management (asked once; cuda-bindings:
        cuda.core 1.2 has no VMM API). Without it, restore allocates as before."""
        if self._vmm_ok is None:
            self._activate()
            attr = driver().CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
            ok = check(driver().cuDeviceGetAttribute(attr, self._cudev), "cuDeviceGetAttribute")
            self._vmm_ok = bool(ok)
        return self._vmm_ok

    def adopt_pointer(self, ptr: int, size: int) -> CudaBuffer:
        """Wrap ``size`` bytes of existing device memory at ``ptr`` (a framework tensor, say) after
        the policy check. Closing the result never zeroes or frees that memory."""
        self.check_pointer(ptr, size)
        if ptr % 16:
            raise InvalidInput("adopted device memory must be 16-byte aligned (the kernels load 16 bytes)")
        buf = CudaBuffer(self, ptr, size, size, owned=False)
        with self._live_lock:
            self._live.add(buf)
        return buf

    def _release(self, buf: CudaBuffer) -> None:
        with self._live_lock:
            self._live.discard(buf)
        if isinstance(buf, VmmBuffer):
            buf._vmm.release()  # zeroed (after its copies and kernels), unmapped, released
            return
        if not buf._owned:
            return
        # Zeroed on the compute stream, synchronized, then cuMemFree (the resource makes the
        # device current itself: this also runs while the backend closes).
        mem, buf._mem = buf._mem, None
        self._mr.free(mem)

    # -- policy ----------------------------------------------------------------------------------

    def check_policy(self, buf: DeviceBuffer) -> None:
        if not isinstance(buf, CudaBuffer) or buf._backend is not self:
            raise PolicyViolation("buffer does not belong to this CUDA backend")
        buf.check_open()  # a progressive buffer only once every chunk is mapped
        if isinstance(buf, VmmBuffer):
            self._check_vmm(buf)
            return
        self.check_pointer(buf._ptr, buf.size)

    def _check_vmm(self, buf: VmmBuffer) -> None:
        """The policy for a ``VmmBuffer``: ``check_pointer`` asks whether one range lies inside one
        allocation, but a VMM range is one driver allocation per chunk. So each chunk is checked
        on its own: its pointer attributes (memory type DEVICE, not managed, this device's
        ordinal), and what is mapped there (``VmmRange.check``: the handle we created, plain
        device memory of this device), and the chunks must cover the buffer contiguously."""
        if self.integrated and not self._allow_integrated:
            raise PolicyViolation(
                f"device {self.device} is an integrated GPU: its memory is host memory, not VRAM "
                "(pass allow_integrated=True to accept that)"
            )
        self._activate()
        device_type = int(driver().CUmemorytype.CU_MEMORYTYPE_DEVICE)
        for addr in buf._vmm.chunk_addresses():
            mtype, managed, ordinal, _start, _length = _pointer_info(addr)
            if mtype != device_type:
                raise PolicyViolation("memory chunk is not device memory")
            if managed:
                raise PolicyViolation("memory chunk is managed (unified) memory")
            if ordinal != self.device:
                raise PolicyViolation(f"memory chunk is on device {ordinal}, not on device {self.device}")
        buf._vmm.check(self.device, buf.size)

    def check_pointer(self, ptr: int, size: int) -> None:
        """Raise PolicyViolation unless ``[ptr, ptr + size)`` is plain device memory (not host,
        pinned, mapped or managed memory) inside one allocation on this backend's device."""
        if not _is_int(ptr) or not _is_int(size):
            raise InvalidInput("pointer and size must be integers")
        if ptr <= 0 or size < 1 or ptr + size > 1 << 64:
            raise InvalidInput("pointer range out of bounds")
        if self.integrated and not self._allow_integrated:
            raise PolicyViolation(
                f"device {self.device} is an integrated GPU: its memory is host memory, not VRAM "
                "(pass allow_integrated=True to accept that)"
            )
        self._activate()
        drv = driver()
        # cuda-bindings: the policy needs the allocation's range (start and size) and the raw
        # memory type, which cuda.core 1.2 does not expose for an arbitrary address.
        mtype, managed, ordinal, start, length = _pointer_info(ptr)
        if mtype == 0:
            raise PolicyViolation("memory is not known to CUDA: ordinary (pageable) host memory, not VRAM")
        if mtype != int(drv.CUmemorytype.CU_MEMORYTYPE_DEVICE):
            raise PolicyViolation("memory is host memory (pinned or mapped), not VRAM")
        if managed:
            raise PolicyViolation("memory is managed (unified) memory, which the driver may move to the host")
        if ordinal != self.device:
            raise PolicyViolation(f"memory is on device {ordinal}, not on device {self.device}")
        if ptr < start or ptr + size > start + length:
            raise PolicyViolation("range extends past the end of its device allocation")

    # -- copies ----------------------------------------------------------------------------------

    def _is_pinned(self, addr: int, n: int) -> bool:
        # Our own open pinned buffers (``pinned_host_buffer``: a caller's source for seals) are
        # known without asking the driver: a cuPointerGetAttributes of five attributes through
        # cuda-bindings is one more call before a seal's first copy. A closed buffer is skipped
        # (its memory may be anything now) and any other address is asked as before.
        # Over a snapshot taken under the set's lock: a WeakSet is iterated by Python code, and
        # a pinned_host_buffer() on another thread meanwhile failed the scan ("Set changed size
        # during iteration").
        with self._own_pinned_lock:
            owned = list(self._own_pinned)
        for own in owned:
            if not own.closed and own.address <= addr and addr + n <= own.address + own.size:
                return True
        self._activate()
        mtype, _, _, start, length = _pointer_info(addr)
        return mtype == int(driver().CUmemorytype.CU_MEMORYTYPE_HOST) and addr + n <= start + length

    def _staging_pool(self) -> list[tuple[PinnedHostBuffer, Any]]:
        if not self._staging:
            for _ in range(self._staging_count):
                pinned = PinnedHostBuffer(self._staging_bytes, self._dev)
                self._staging.append((pinned, _event(self._dev, timing=False)))
            if self._copy_threads > 1:
                self._copy_pool = ThreadPoolExecutor(self._copy_threads, thread_name_prefix="vram-stage")
        return self._staging

    def _copy_in(
        self,
        dst: int,
        view: memoryview,
        on_chunk: Callable[[int], None] | None = None,
        prepare: Callable[[int], int] | None = None,
    ) -> None:
        """Host to device, ``len(view)`` bytes to device address ``dst``. ``on_chunk(done)`` runs
        after each chunk's copy is queued, with ``done`` bytes queued so far. ``prepare(off)``
        runs before the chunk at ``off`` is queued and returns how far the destination is ready
        (a progressive buffer's ``map_chunk_at``: it maps the memory chunk holding ``off`` while
        the copies queued before still run); a copy chunk never crosses that end, so the copy
        follows the memory chunks (the first copy is the first, small, memory chunk alone).

        cuda-bindings for the copies: cuda.core copies whole Buffers; these are byte ranges of a
        device allocation and of host memory of any origin."""
        self._activate()
        drv = driver()
        n = len(view)
        addr, src = host_address(view)
        step = self._staging_bytes

        if n <= _DIRECT_COPY_LIMIT or self._is_pinned(addr, n):
            # Small copies go straight through; pinned bytes need no staging.
            try:
                for off, m in _copy_steps(n, step, prepare):
                    check(
                        drv.cuMemcpyHtoDAsync(dst + off, addr + off, m, self._copy_stream.handle),
                        "cuMemcpyHtoDAsync",
                    )
                    if on_chunk is not None:
                        on_chunk(off + m)
            except BaseException:
                self._drain_copies()
                raise
            self._sync(self._copy_stream, "host-to-device copy")
            return
        with self._staging_lock:
            pool = self._staging_pool()
            try:
                for i, (off, m) in enumerate(_copy_steps(n, step, prepare)):
                    pinned, done = pool[i % len(pool)]
                    _event_sync(done, "waiting for a staging buffer")
                    parallel_copy(self._copy_pool, pinned.array, src[off : off + m], self._copy_threads)
                    check(
                        drv.cuMemcpyHtoDAsync(dst + off, pinned.address, m, self._copy_stream.handle),
                        "cuMemcpyHtoDAsync",
                    )
                    _record(self._copy_stream, done)
                    if on_chunk is not None:
                        on_chunk(off + m)
            except BaseException:
                self._drain_copies()
                raise
            self._sync(self._copy_stream, "host-to-device copy")

    def _drain_copies(self) -> None:
        """After a failure part-way through ``_copy_in`` (a launch in ``on_chunk``, a mapping in
        ``prepare``, a copy that failed to queue): let the copies already queued finish before
        the error reaches the caller, who may then reuse its source memory or free the buffer
        (whose zeroing runs on the compute stream and would not wait for a late copy). A broken
        context fails this too, and then nothing is in flight."""
        with contextlib.suppress(Exception):
            self._copy_stream.sync()

    def _copy_out(self, src: int, n: int) -> bytes:
        self._activate()
        out = bytearray(n)
        addr, _keep = host_address(memoryview(out))
        check(driver().cuMemcpyDtoHAsync(addr, src, n, self._copy_stream.handle), "cuMemcpyDtoHAsync")
        self._sync(self._copy_stream, "device-to-host copy")
        return bytes(out)

    def pinned_host_buffer(self, size: int) -> PinnedHostBuffer:
        """Page-locked host memory of ``size`` bytes; writes from it skip staging."""
        self._activate()
        pinned = PinnedHostBuffer(size, self._dev)
        with self._own_pinned_lock:
            self._own_pinned.add(pinned)
        return pinned

    # -- digests ---------------------------------------------------------------------------------

    def _module(self, algorithm: str) -> Module:
        return self._source_module(_SOURCES[algorithm])

    def _source_module(self, source: str) -> Module:
        mod = self._modules.get(source)
        if mod is None:
            mod = Module(source, self.arch, self._kernel_defines.get(source))
            self._modules[source] = mod
        return mod

    def _blocks_per_sm(self, mod: Module, name: str, threads: int = _THREADS) -> int:
        key = (name, threads)
        if key not in self._occupancy:
            self._occupancy[key] = max(1, mod.blocks_per_sm(name, threads))
        return self._occupancy[key]

    def _sha_units_kernel(self, mod: Module, units: int) -> str:
        return self._pick_units_kernel(mod, units, ("sha256_tree_units", "sha256_tree_units_occ4"))

    def _pick_units_kernel(self, mod: Module, units: int, names: tuple[str, str]) -> str:
        """The sha256-tree-v1 unit kernel with the shorter expected run for this many units:
        time ~ waves x blocks per SM / per-SM speed, where the lower-occupancy build (more
        registers) was measured 6.5% faster per block on an H200 (4 GiB shards, 845 against
        818 GB/s with 11 and 8 waves)."""
        return self._pick_by_occupancy(units, [(self._blocks_per_sm(mod, n), n) for n in names])

    def _pick_by_occupancy(self, units: int, options: list[tuple[int, str]]) -> str:
        k_max = max(k for k, _ in options)
        best, best_t = options[0][1], float("inf")
        for k, name in options:
            speed = _LOW_OCCUPANCY_SPEEDUP if k < k_max else 1.0
            t = -(-units // (self.multiprocessors * k)) * k / speed
            if t < best_t:
                best, best_t = name, t
        return best

    def warm_up(self, algorithms: Sequence[str] = (SHA256_TREE_V1, BLAKE3)) -> None:
        """Compile and load the kernels now rather than at the first hash (about a second each)."""
        with self._lock:
            self._activate()
            for alg in algorithms:
                self._module(check_algorithm(alg))

    def _scratch(self, nbytes: int) -> int:
        # One growing device buffer for unit digests and tree levels: 32 to 288 bytes per MiB of
        # shard plus a little (well under the 1% budget), reused so that hashing allocates nothing
        # in the steady state.
        if nbytes > self._scratch_size:
            if self._scratch_mem is not None:
                # Graphs name the scratch; the grown one may come back at the same address.
                self._graphs.invalidate()
                mem, self._scratch_mem = self._scratch_mem, None
                self._scratch_ptr, self._scratch_size = 0, 0
                self._scratch_mr.free(mem)
            size = -(-nbytes // 4096) * 4096
            try:
                mem = self._scratch_mr.allocate(size)
            except CuMemAllocFailed as exc:
                if exc.name == OUT_OF_MEMORY:
                    free = self.mem_info()[0]
                    raise InsufficientVram(size, free, "insufficient VRAM for digest scratch space") from exc
                raise _driver.map_name(exc.name, "cuMemAlloc (digest scratch)") from exc
            self._scratch_mem = mem
            self._scratch_ptr, self._scratch_size = int(mem.handle), size
        return self._scratch_ptr

    def _result_buffer(self, nbytes: int) -> PinnedHostBuffer:
        if self._results is None or self._results.size < nbytes:
            if self._results is not None:
                self._graphs.invalidate()  # graphs' copies land in it (see _scratch)
                # Forgotten before it is closed: a close that fails must not leave a closed
                # buffer here, whose size would still satisfy later calls.
                old, self._results = self._results, None
                # cuMemFreeHost does not wait for our streams (cuda.core synchronizes the
                # context's legacy default stream, which non-blocking streams never join), and a
                # call that failed or was interrupted between queuing its copies into this
                # buffer and its synchronization (an error of the end event's record after a
                # graph launch, say) left them in flight: they would land in freed host memory.
                _drain(self._stream)
                old.close()
            self._results = PinnedHostBuffer(max(64 << 10, -(-nbytes // (64 << 10)) * (64 << 10)), self._dev)
        return self._results

    def hash(
        self,
        buf: DeviceBuffer,
        algorithm: str,
        length: int | None = None,
        *,
        key: bytes | None = None,
        priority: Priority = "normal",
    ) -> HashResult:
        """Digest and unit digests. Keyed digests, ``priority="low"`` and algorithms without a
        tuned single-segment path (``_SOURCES``; nh-fast-v1) go through the segment table path (a
        table of one), which has the keyed and low-priority kernels and stream."""
        if key is not None or priority != "normal" or algorithm not in _SOURCES:
            n = buf.size if length is None else length
            return self.hash_many([Segment(buf, n, algorithm, key)], priority=priority)[0]
        result = self._hash_buffer(buf, algorithm, length, units=True)[1]
        if result is None:  # pragma: no cover - units=True always yields one
            raise IntegrityViolation("digest kernels returned no unit digests")
        return result

    def digest(
        self,
        buf: DeviceBuffer,
        algorithm: str,
        length: int | None = None,
        *,
        key: bytes | None = None,
        priority: Priority = "normal",
    ) -> bytes:
        """The digest alone (the verify path): no unit digests are copied back, and for blake3 the
        chunk layer is hashed once instead of twice (unit digests need a second set of counters).
        ``key``: BLAKE3 keyed mode (32 bytes); ``priority``: see ``digest_many``."""
        if key is not None or priority != "normal" or algorithm not in _SOURCES:
            n = buf.size if length is None else length
            return self.digest_many([Segment(buf, n, algorithm, key)], priority=priority)[0]
        return self._hash_buffer(buf, algorithm, length, units=False)[0]

    def digest_many(
        self,
        segments: Sequence[Segment],
        *,
        priority: Priority = "normal",
        while_running: WhileRunning | None = None,
    ) -> list[bytes]:
        """Digests of every segment, in order, in one pass: one upload of a segment table, one
        launch per (algorithm, kernel) over all units of all segments, one per tree level, one
        copy back and one synchronization. Bit-identical to ``digest`` of each segment.

        ``priority="low"`` (background scrubbing) runs on a stream of the device's lowest priority
        with its own scratch, so that it never waits for, or holds up, the normal verify path's
        lock; its wait for the kernels (``LOW_WAIT``) holds neither the GIL nor a CPU core. Keep
        each call bounded (a few hundred MiB): it holds the locks of its buffers, which a
        foreground verify of the same buffers waits for. Note that CUDA's lowest
        priority is also the default one: a low stream yields only to streams created with a
        higher priority, so the scrubber's GPU-time budget is what protects serving.

        A table of one unkeyed sha256-tree-v1 or blake3 segment at normal priority (a single
        shard's verify or attestation) runs on the tuned single-segment path instead: one table
        of a 16 GiB shard took 20.5 ms against 20.1-20.4 ms there (H200).

        ``while_running`` (``Backend.digest_many``) is called on every path once the kernels and
        the copy back are queued, before the one synchronization, with the backend's and the
        buffers' locks held: it must not call into this backend. If it raises, the stream is
        synchronized before its exception propagates, so that nothing is left in flight into the
        pinned buffers or scratch that the next call reuses."""
        if len(segments) == 1 and priority == "normal":
            seg = segments[0]
            if isinstance(seg, Segment) and seg.key is None and seg.algorithm in _SOURCES:
                return [
                    self._hash_buffer(
                        seg.buf, seg.algorithm, seg.length, units=False, while_running=while_running
                    )[0]
                ]
        return self._run_mixed(segments, want_units=False, priority=priority, while_running=while_running)[0]

    def hash_many(self, segments: Sequence[Segment], *, priority: Priority = "normal") -> list[HashResult]:
        """``hash`` of every segment (digest and unit digests), in one pass like ``digest_many``."""
        hashed = self._run_mixed(segments, want_units=True, priority=priority)[1]
        if hashed is None:  # pragma: no cover - want_units always yields them
            raise IntegrityViolation("segment table returned no unit digests")
        return hashed

    def _run_mixed(
        self,
        segments: Sequence[Segment],
        *,
        want_units: bool,
        priority: str,
        while_running: WhileRunning | None = None,
    ) -> tuple[list[bytes], list[HashResult] | None]:
        """A segment table that may hold nh-fast-v1 entries: those go to the nh-fast launcher
        (``_nh_fast.nh_fast_many``: one job per segment on the compute stream, one
        synchronization), the rest to the batched table kernels unchanged; results in order.
        Every entry is checked before any work starts. ``while_running`` runs once, in the last
        of the (at most two) sub-batches: the nh-fast one when there is one."""
        nh = [i for i, s in enumerate(segments) if isinstance(s, Segment) and s.algorithm == NH_FAST_V1]
        if not nh:
            return self._run_batch(
                segments, want_units=want_units, priority=priority, while_running=while_running
            )
        if priority not in PRIORITIES:
            raise InvalidInput(f"priority must be one of {PRIORITIES}, not {priority!r}")
        nh_rows = [self._check_nh_segment(segments[i]) for i in nh]
        if len(nh_rows) == len(segments):
            # Only nh-fast-v1 entries (a fast verify, a verify_sealed of an nh-fast-v1 shard): no
            # table part and nothing to interleave.
            nh_digests, nh_hashed = self._nh_fast_rows(
                nh_rows, want_units=want_units, while_running=while_running, priority=priority
            )
            return nh_digests, (nh_hashed if want_units else None)
        chosen = set(nh)
        rest = [s for i, s in enumerate(segments) if i not in chosen]
        for s in rest:
            self._check_segment(s)
        digests_rest, hashed_rest = (
            self._run_batch(rest, want_units=want_units, priority=priority) if rest else ([], [])
        )
        nh_digests, nh_hashed = self._nh_fast_rows(
            nh_rows, want_units=want_units, while_running=while_running, priority=priority
        )
        digests: list[bytes] = []
        hashed: list[HashResult] = []
        it_nh, it_hashed, it_rest = iter(nh_digests), iter(nh_hashed), iter(range(len(rest)))
        for i in range(len(segments)):
            if i in chosen:
                digests.append(next(it_nh))
                if want_units:
                    hashed.append(next(it_hashed))
            else:
                j = next(it_rest)
                digests.append(digests_rest[j])
                if want_units:
                    assert hashed_rest is not None  # want_units
                    hashed.append(hashed_rest[j])
        return digests, (hashed if want_units else None)

    def _check_nh_segment(self, seg: Segment) -> tuple[CudaBuffer, int, bytes]:
        buf, n, key = seg.buf, seg.length, seg.key
        if not isinstance(buf, CudaBuffer) or buf._backend is not self:
            raise InvalidInput("buffer does not belong to this CUDA backend")
        check_range(buf.size, 0, n)
        check_key(NH_FAST_V1, key)
        assert key is not None  # check_key
        if buf._ptr % 16:
            # Typed as unsupported (not bad input): the store then keeps no fast digest for such
            # memory (an adopted tensor view at an odd offset) and checks it in full.
            raise UnsupportedOperation("nh-fast-v1 on CUDA needs 16-byte aligned device memory")
        return buf, n, key

    def _nh_fast_rows(
        self,
        rows: Sequence[tuple[CudaBuffer, int, bytes]],
        *,
        want_units: bool,
        while_running: WhileRunning | None = None,
        priority: str = "normal",
    ) -> tuple[list[bytes], list[HashResult]]:
        """Digests (and with ``want_units`` the full results) of nh-fast-v1 rows; without unit
        digests the digest is finished on the device (``_nh_fast.nh_fast_digests``).
        ``priority="low"``: on the low lane (``kernel_session``), as the low tables run."""
        # Each distinct buffer's lock, in one global order (as _run_batch takes them), then the
        # backend's lock inside the launcher: the order _hash_buffer uses as well.
        bufs = sorted({id(b): b for b, _, _ in rows}.values(), key=id) if len(rows) > 1 else [rows[0][0]]
        held: list[CudaBuffer] = []
        try:
            for b in bufs:
                b._lock.acquire()
                held.append(b)
                b.check_open()
            table = [(b._ptr, n, k) for b, n, k in rows]
            if want_units:
                hashed = _nh_fast.nh_fast_many(self, table, while_running=while_running, priority=priority)
                return [r.digest for r in hashed], hashed
            return _nh_fast.nh_fast_digests(self, table, while_running=while_running, priority=priority), []
        finally:
            for b in reversed(held):
                b._lock.release()

    def _check_segment(self, seg: object) -> tuple[CudaBuffer, int, str, bytes | None]:
        # Called once per tensor of every verify: the common case is decided with a few type and
        # dict checks (a 150-tensor table in ~0.1 ms); the general checks then give the errors.
        if type(seg) is not Segment and not isinstance(seg, Segment):
            raise InvalidInput(f"segment tables hold Segment entries, not {type(seg).__name__}")
        buf, n, algorithm, key = seg.buf, seg.length, seg.algorithm, seg.key
        if not isinstance(buf, CudaBuffer) or buf._backend is not self:
            raise InvalidInput("buffer does not belong to this CUDA backend")
        spec = _batch.BATCH_ALGORITHMS.get(algorithm) if type(algorithm) is str else None
        if spec is None:
            check_algorithm(algorithm)  # InvalidInput for a name that is not an algorithm
            raise UnsupportedOperation(f"no batched kernels for {algorithm!r}")
        if type(n) is not int or not 0 <= n <= buf.size:
            check_range(buf.size, 0, n)
        if key is not None:
            if not spec.keyed:
                raise InvalidInput(f"digest algorithm {algorithm!r} takes no key")
            if type(key) is not bytes or len(key) != 32:
                raise InvalidInput("a BLAKE3 key is 32 bytes")
        return buf, n, algorithm, key

    def _lane(self, priority: str) -> _Lane:
        if priority not in PRIORITIES:
            raise InvalidInput(f"priority must be one of {PRIORITIES}, not {priority!r}")
        lane = self._lanes.get(priority)
        if lane is None:
            with self._lock:
                lane = self._lanes.get(priority)
                if lane is None:
                    self._activate()
                    lane = _Lane(self, low=priority == "low")
                    self._lanes[priority] = lane
        return lane

    def _table_kernels(self, algorithms: AbstractSet[str]) -> dict[tuple[str, str], Any]:
        """Every table kernel of these algorithms, loaded, with the occupancy of the units
        kernels known, so that the lanes then launch and choose without the backend's lock (the
        low lane must never wait for a normal verify). Once loaded, the set is kept and read
        without the lock: a foreground verify holds the lock through its synchronization, and a
        background table must not wait for it."""
        loaded = self._table_fns.get(frozenset(algorithms))
        if loaded is not None:
            return loaded
        fns: dict[tuple[str, str], Any] = {}
        with self._lock:  # module loading and the function caches are shared state
            self._activate()
            for a in algorithms:
                spec = _batch.BATCH_ALGORITHMS[a]
                mod = self._source_module(spec.source)
                names = (
                    spec.units_kernel,
                    spec.units_kernel_occ4,
                    spec.standalone_kernel,
                    spec.reduce_kernel,
                )
                for name in filter(None, names):
                    fns[a, name] = mod.function(name)
                if spec.units_kernel_occ4 is not None:
                    for name in (spec.units_kernel, spec.units_kernel_occ4):
                        self._blocks_per_sm(mod, name)
            self._table_fns[frozenset(algorithms)] = fns
        return fns

    def _pick_table_units(self, spec: _batch.TableAlgorithm, units: int) -> str:
        if spec.units_kernel_occ4 is None:
            return spec.units_kernel
        names = (spec.units_kernel, spec.units_kernel_occ4)
        return self._pick_by_occupancy(units, [(self._occupancy[n, _THREADS], n) for n in names])

    def _table_columns(self, segments: Sequence[Segment]) -> TableColumns:
        """Check every entry of a segment table (before any work starts) and gather it as
        columns: buffers, device addresses, lengths, algorithms, keys.

        Runs once per entry of every batched verify (1,000 tensors: 1,000 entries), so the
        common entry (a Segment of a CudaBuffer of this backend, an int length
        within the buffer, a batched algorithm, no key) is accepted by a few identity and type
        tests inline; any other entry goes through ``_check_segment``, which gives the errors.
        A buffer's address never changes while it exists (whether it is still open is checked
        under its lock, in ``_run_batch``)."""
        bufs: list[CudaBuffer] = []
        ptrs: list[int] = []
        lens: list[int] = []
        algs: list[str] = []
        keys: list[bytes | None] = []
        batched = _batch.BATCH_ALGORITHMS
        for seg in segments:
            if type(seg) is Segment:
                buf, n, algorithm, key = seg.buf, seg.length, seg.algorithm, seg.key
                if (
                    type(buf) is CudaBuffer
                    and buf._backend is self
                    and type(n) is int
                    and 0 <= n <= buf.size
                    and key is None
                    and type(algorithm) is str
                    and algorithm in batched
                ):
                    bufs.append(buf)
                    ptrs.append(buf._ptr)
                    lens.append(n)
                    algs.append(algorithm)
                    keys.append(None)
                    continue
            buf, n, algorithm, key = self._check_segment(seg)
            bufs.append(buf)
            ptrs.append(buf._ptr)
            lens.append(n)
            algs.append(algorithm)
            keys.append(key)
        return TableColumns(bufs, ptrs, lens, algs, keys)

    def _prepared_table(self, segments: Sequence[Segment]) -> _PreparedTable:
        """``segments`` checked and gathered (``_table_columns``), with its buffers in lock order
        and its plan-cache key, reused when the very same Segment objects come again in the same
        order: a store's verify plan presents one list of Segments for every verify of a model,
        and on the H200's host gathering, sorting and keying 149 of them took a noticeable share of
        a 1.3 ms verify_model, all before the first kernel. A Segment is frozen and a buffer's
        address and size never change, so what was checked still holds for the same objects;
        whether each buffer is still open is checked under its lock on every run. Tables with
        keys are not kept (no key material outlives its call here)."""
        n = len(segments)
        ident = (n, id(segments[0]), id(segments[-1])) if n else (0, 0, 0)
        with self._prepared_lock:
            hit = self._prepared.get(ident)
            if hit is not None:
                self._prepared.move_to_end(ident)
        if hit is not None and all(map(operator.is_, hit.segments, segments)):
            return hit
        cols = self._table_columns(segments)
        # Buffers hash and compare by identity: the set and the sort by id run in C.
        bufs = sorted(set(cols.bufs), key=id)
        keyed = cols.keys.count(None) != len(cols.keys)
        plan_key = None if keyed else (tuple(cols.ptrs), tuple(cols.lens), tuple(cols.algs), tuple(cols.keys))
        prepared = _PreparedTable(tuple(segments), cols, bufs, frozenset(cols.algs), plan_key)
        if not keyed and n:
            with self._prepared_lock:
                self._prepared[ident] = prepared
                while len(self._prepared) > _PLAN_CACHE:
                    self._prepared.popitem(last=False)
        return prepared

    def _run_batch(
        self,
        segments: Sequence[Segment],
        *,
        want_units: bool,
        priority: str,
        while_running: WhileRunning | None = None,
    ) -> tuple[list[bytes], list[HashResult] | None]:
        lane = self._lane(priority)
        prepared = self._prepared_table(segments)
        cols = prepared.cols
        if not cols.bufs:
            if while_running is not None:
                while_running()  # an empty table: nothing to queue, nothing to wait for
            return [], ([] if want_units else None)
        # Each distinct buffer's lock, in one global order (two batches never wait on each other
        # in a cycle): no buffer can be freed while kernels read it.
        held: list[CudaBuffer] = []
        try:
            for b in prepared.bufs:
                b._lock.acquire()
                held.append(b)
                if b._closed:
                    b.check_open()  # raises
            fns = self._table_kernels(prepared.algs)
            with lane.lock:
                self._activate()
                plan = lane.plan(cols, want_units, self._pick_table_units, prepared.plan_key)
                out = lane.run(plan, fns, while_running)
        finally:
            for b in reversed(held):
                b._lock.release()
        return _batch.results(plan, out)

    def _hash_buffer(
        self,
        buf: DeviceBuffer,
        algorithm: str,
        length: int | None,
        *,
        units: bool,
        while_running: WhileRunning | None = None,
    ) -> tuple[bytes, HashResult | None]:
        algorithm = check_algorithm(algorithm)
        if not isinstance(buf, CudaBuffer) or buf._backend is not self:
            raise InvalidInput("buffer does not belong to this CUDA backend")
        n = buf.size if length is None else length
        check_range(buf.size, 0, n)
        with buf._lock:
            buf.check_open()
            with self._lock:
                self._activate()
                job = _HashJob(self, algorithm, buf._ptr, n, units)
                if GRAPHS:
                    return job.run(self._graphs, while_running)
                job.launch_units(0, job.units)
                return job.finish(while_running)

    def write_and_hash(
        self, buf: DeviceBuffer, data: Buffer, algorithm: str, *, key: bytes | None = None
    ) -> HashResult:
        """Seal path: copy ``data`` to the start of ``buf`` and return the digest and unit digests
        of those bytes. Hashing of each staged chunk's units starts as soon as its copy lands, so
        copying and hashing overlap (nh-fast-v1 as well, through ``_nh_fast.NhFastJob``)."""
        algorithm = check_algorithm(algorithm, keyed=True)
        check_key(algorithm, key)
        if not isinstance(buf, CudaBuffer) or buf._backend is not self:
            raise InvalidInput("buffer does not belong to this CUDA backend")
        view = memoryview(data).cast("B")
        n = len(view)
        check_range(buf.size, 0, n)
        if algorithm == NH_FAST_V1:
            assert key is not None  # check_key
            return self._write_and_nh_fast(buf, view, key)
        if key is not None:
            # Keyed BLAKE3 has no overlapped single-segment kernels: copy, then a table of one.
            buf.map_through(n)
            buf.write(0, view)
            return self.hash_many([Segment(buf, n, algorithm, key)])[0]
        # A progressive buffer (restore) maps each chunk just before its copy is queued
        # (_copy_in's prepare): creating chunk k+1 overlaps the copy of chunk k.
        prepare = buf.map_chunk_at if buf.mapped < n else None
        with buf._lock:
            buf.check_mapped(0)  # open; the rest is mapped as the copy advances
            with self._lock:
                self._activate()
                job = _HashJob(self, algorithm, buf._ptr, n, True)
                if _one_copy_seal(buf, n, self._staging_bytes):
                    addr, keep = host_address(view)
                    if n <= _DIRECT_COPY_LIMIT or self._is_pinned(addr, n):
                        return self._seal_one_copy(job, addr, keep)
                launched = 0

                def on_chunk(done: int) -> None:
                    nonlocal launched
                    ready = job.units if done >= n else done // UNIT_SIZE
                    if ready > launched:
                        _record(self._copy_stream, self._xfer_event)
                        _stream_wait(self._stream, self._xfer_event)
                        job.launch_units(launched, ready)
                        launched = ready

                if n:
                    self._copy_in(buf._ptr, view, on_chunk, prepare)
                if launched < job.units:
                    job.launch_units(launched, job.units)
                # The host threads' staged copies cannot be captured; the tail after the unit
                # kernels (join, reduction, copies back) can: a seal into the same buffer again
                # (a benchmark, a re-seal) queues it as one graph launch.
                result = job.finish(graphs=self._graphs if GRAPHS else None)[1]
                if result is None:  # pragma: no cover - the job was built with units
                    raise IntegrityViolation("digest kernels returned no unit digests")
                return result

    def _seal_one_copy(self, job: _HashJob, addr: int, keep: object) -> HashResult:
        """``write_and_hash`` of bytes that go up in one copy without staging (up to 1 MiB, or
        pinned up to the staging size): the copy is queued on the compute stream itself, ahead
        of the unit kernels, so stream order replaces the copy stream's event record, the
        compute stream's wait on it and the copy stream's synchronization (three cuda.core
        calls of a 1 MiB seal's host time); the one synchronization in ``finish`` covers the
        copy. Callers hold ``_lock`` with the context current. ``keep``: the source's host
        array, alive until the copy has run."""
        stream = self._stream.handle
        try:
            # A pageable source (up to 1 MiB here) is staged by the driver before this returns;
            # a pinned one is read when the copy runs, before finish's synchronization returns.
            check(driver().cuMemcpyHtoDAsync(job.ptr, addr, job.n, stream), "cuMemcpyHtoDAsync")
            if GRAPHS:
                # Everything after the copy (unit kernels, reduction, copies back) is what a
                # hash() of the same bytes queues: one graph launch for a seal into the same
                # buffer again. The copy itself stays outside the graph: its source is the
                # caller's memory, at an address that means nothing the next time.
                result = job.run(self._graphs)[1]
            else:
                job.launch_units(0, job.units)
                result = job.finish()[1]
        except BaseException:
            # Let a queued copy from the caller's memory finish before the caller may reuse it.
            with contextlib.suppress(Exception):
                self._stream.sync()
            raise
        finally:
            del keep
        if result is None:  # pragma: no cover - the job was built with units
            raise IntegrityViolation("digest kernels returned no unit digests")
        return result

    def _write_and_nh_fast(self, buf: CudaBuffer, view: memoryview, key: bytes) -> HashResult:
        """``write_and_hash`` for nh-fast-v1: each whole unit's leaves and unit digest are queued
        on the compute stream as soon as the copy stream has landed them."""
        n = len(view)
        if buf._ptr % 16:
            raise UnsupportedOperation("nh-fast-v1 on CUDA needs 16-byte aligned device memory")
        prepare = buf.map_chunk_at if buf.mapped < n else None  # progressive: see write_and_hash
        with buf._lock:
            buf.check_mapped(0)
            with self.kernel_session() as ks:
                job = _nh_fast.new_job(ks, buf._ptr, n, key)
                self.last_units_kernel = job.units_kernel

                def landed() -> None:
                    # The compute stream waits for what the copy stream has queued so far.
                    _record(self._copy_stream, self._xfer_event)
                    _stream_wait(self._stream, self._xfer_event)

                def on_chunk(done: int) -> None:
                    ready = job.units if done >= n else done // UNIT_SIZE
                    if ready > job.units_done:
                        landed()
                        job.launch_ready(done)

                if n:
                    self._copy_in(buf._ptr, view, on_chunk, prepare)
                if job.units_done < job.units:
                    landed()  # the copy stream has synchronized; this orders nothing but is cheap
                return job.finish(ks.result_buffer(32 * job.units))

    def sha256_messages(self, messages: Sequence[bytes]) -> list[bytes]:
        """Plain SHA-256 of each message, computed by the same device SHA-256 core as the tree
        kernels (a test entry: NIST's CAVP vectors check the device code through it)."""
        if not messages:
            return []
        with self._lock:
            self._activate()
            drv = driver()
            mod = self._module(SHA256_TREE_V1)
            offs, off = [], 0
            for m in messages:
                offs.append(off)
                off += len(m)
            blob = b"".join(messages) or b"\x00"
            meta = np.array(offs + [len(m) for m in messages], dtype=np.uint64).tobytes()
            count = len(messages)
            sizes = (len(blob), len(meta), 32 * count)
            mems: list[Any] = []
            ptrs: list[int] = []
            try:
                for s in sizes:
                    try:
                        mems.append(self._scratch_mr.allocate(-(-s // 256) * 256))
                    except CuMemAllocFailed as exc:
                        raise _driver.map_name(exc.name, "cuMemAlloc") from exc
                    ptrs.append(int(mems[-1].handle))
                for p, data in ((ptrs[0], blob), (ptrs[1], meta)):
                    addr, _k = host_address(memoryview(data))
                    check(drv.cuMemcpyHtoD(p, addr, len(data)), "cuMemcpyHtoD")
                args: list[Arg] = [
                    (U64, ptrs[0]),
                    (U64, ptrs[1]),
                    (U64, ptrs[1] + 8 * count),
                    (U32, count),
                    (U64, ptrs[2]),
                ]
                fn = mod.function("sha256_messages")
                launch(fn, -(-count // 64), 64, self._stream, args, what="sha256_messages")
                self._sync(self._stream, "sha256_messages")
                out = self._copy_out(ptrs[2], 32 * count)
            finally:
                for mem in mems:
                    with contextlib.suppress(Exception):  # as before: a failed free is not reported
                        self._scratch_mr.free(mem)
            return [out[32 * i : 32 * i + 32] for i in range(count)]

    def _reduce_nodes(self, algorithm: str, nodes: bytes) -> bytes:
        """Test entry: the tree kernels' reduction of ``len(nodes) // 32`` >= 2 nodes to the root
        node (sha256-tree-v1: R; blake3: the digest, ROOT on the final parent)."""
        algorithm = check_algorithm(algorithm)
        count = len(nodes) // 32
        if count < 2 or len(nodes) % 32:
            raise InvalidInput("need at least two 32-byte nodes")
        with self._lock:
            self._activate()
            drv = driver()
            mod = self._module(algorithm)
            level = 32 * -(-count // _GROUP)
            base = self._scratch(len(nodes) + 2 * level + 32)
            addr, _keep = host_address(memoryview(nodes))
            check(drv.cuMemcpyHtoD(base, addr, len(nodes)), "cuMemcpyHtoD")
            ping = base + len(nodes)
            root = _reduce_chain(
                self._stream, mod, algorithm, base, count, ping, ping + level, ping + 2 * level
            )
            self._sync(self._stream, "tree reduction")
            return self._copy_out(root, 32)

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Zero and free every buffer still allocated, then release streams, modules, staging and
        the device context. Idempotent."""
        if self._closed:
            return
        with self._live_lock:
            live = list(self._live)
        for buf in live:
            buf.close()
        with self._lock, self._staging_lock:
            # Set before any lane is closed: the low lane's users hold its lock, not the
            # backend's, and one that was waiting for that lock while close() closed the lane
            # would otherwise find ``_activate`` passing (``_closed`` is set only at the end) and
            # run on the closed lane: a new arena and pinned buffer that nobody frees, launches
            # on its closed stream, kernels of modules unloaded meanwhile, graphs captured into
            # its closed cache. Every user of a lane calls ``_activate`` under the lane's lock.
            self._closing = True
            # As before, teardown reports nothing: each step runs whatever the previous one did.
            quiet = contextlib.suppress(Exception)
            with quiet:
                self._dev.set_current()
            for stream in (self._stream, self._copy_stream):
                with quiet:
                    stream.sync()
            # Before the lanes: the normal lane's table graphs are in this cache and name its
            # arena, which lane.close() frees (CUDA wants memory to outlive the graphs using
            # it); and before the modules whose kernels they name.
            self._graphs.close()
            for lane in self._lanes.values():
                with lane.lock:
                    lane.close()
            self._lanes.clear()
            with quiet:
                self._capture_stream.close()
            with self._prepared_lock:
                self._prepared.clear()
            self._table_fns.clear()
            if self._scratch_mem is not None:
                mem, self._scratch_mem = self._scratch_mem, None
                self._scratch_ptr, self._scratch_size = 0, 0
                with quiet:
                    self._scratch_mr.free(mem)
            if self._results is not None:
                self._results.close()
                self._results = None
            for pinned, ev in self._staging:
                pinned.close()
                with quiet:
                    ev.close()
            self._staging.clear()
            with quiet:
                self._host_pool.clear()
            if self._copy_pool is not None:
                self._copy_pool.shutdown()
                self._copy_pool = None
            for mod in self._modules.values():
                mod.unload()
            self._modules.clear()
            for stream, ev in self._sides:
                with contextlib.suppress(Exception):  # closing: free the rest regardless
                    stream.sync()
                    ev.close()
                    stream.close()
            self._sides.clear()
            for ev in (self._xfer_event, self._t0, self._t1):
                with quiet:
                    ev.close()
            for stream in (self._stream, self._copy_stream):
                with quiet:
                    stream.close()
            # The primary context stays retained by cuda.core for the process (its Device).
            self._closed = True

    def __enter__(self) -> CudaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(stream: Any) -> None:
    """Wait for everything queued on ``stream`` before memory its work may use is freed (a buffer
    grown). A failure is not raised: a broken context fails this too, and then nothing is in
    flight; the free that follows reports what it must."""
    with contextlib.suppress(Exception):
        stream.sync()


def _overlap(while_running: WhileRunning | None, wait: Callable[[], None]) -> None:
    """``while_running()`` (the caller's host work, with the device work queued), then
    ``wait()``. If ``while_running`` raises, ``wait()`` still runs before its exception
    propagates: nothing may stay in flight into the pinned result buffer or the scratch, which
    the next call on this stream reuses (a failing ``wait`` then raises its own error, with the
    callback's as its context)."""
    if while_running is not None:
        try:
            while_running()
        except BaseException:
            wait()
            raise
    wait()


class _HashJob:
    """One digest computation: unit kernels over [0, n) (possibly launched chunk by chunk), then
    the reduction of unit values to the root, all on the backend's compute stream."""

    def __init__(self, backend: CudaBackend, algorithm: str, ptr: int, n: int, units: bool) -> None:
        self.b = backend
        self._on: Any = None
        self.algorithm = algorithm
        self.ptr = ptr
        self.n = n
        self.want_units = units
        self.units = unit_count(n)
        self.mod = backend._module(algorithm)
        u = self.units
        # Small sha256-tree-v1 shards: eight blocks per unit instead of one, so that a 1 MiB
        # verify runs on eight SMs rather than one (sha256_tree_units_split).
        self.split = algorithm == SHA256_TREE_V1 and u <= backend.split_max_units
        # Small blake3 shards: one block per 128 KiB piece (blake3_units_split). Only where no
        # unit digest other than the digest itself is wanted: a verify (digest), or a shard of
        # one unit, whose unit digest is its digest. Unit digests of later units need their own
        # chunk counters (blake3_units_standalone), which pieces of the message tree do not give.
        self.b3_split = algorithm == BLAKE3 and u <= backend.blake3_split_max_units and (not units or u == 1)
        #: Nodes the unit kernels write and _reduce reduces: 128 KiB pieces or 1 MiB units.
        self.nodes = max(1, -(-n // _B3_PIECE)) if self.b3_split else u
        groups = -(-self.nodes // _GROUP)
        # Scratch layout: unit (or piece) values | unit digests (blake3 by units) or subtree
        # nodes (sha256 split) | two tree levels | root. At most 288 bytes per MiB of shard
        # (sha256 split: 32 + 8 x 32 per unit; blake3 split: 32 per 128 KiB piece; otherwise 32
        # or 64 per unit) plus a few hundred bytes.
        self.cv = 0
        self.unit_digests = 32 * self.nodes
        if self.b3_split:
            extra = 0  # the one unit digest (if asked for) is the root
        elif algorithm == BLAKE3:
            extra = 32 * u
        else:
            extra = 256 * u if self.split else 0
        self.ping = self.unit_digests + extra
        self.pong = self.ping + 32 * groups
        self.root = self.pong + 32 * groups
        backend.last_scratch_bytes = self.root + 32
        base = backend._scratch(self.root + 32)
        self.cv += base
        self.unit_digests += base
        self.sub = self.unit_digests
        self.ping += base
        self.pong += base
        self.root += base
        if self.split:
            self.units_kernel = "sha256_tree_units_split"
        elif self.b3_split:
            self.units_kernel = "blake3_units_split"
        elif algorithm == SHA256_TREE_V1:
            self.units_kernel = backend._sha_units_kernel(self.mod, u)
        else:
            self.units_kernel = "blake3_units_standalone" if units and u > 1 else "blake3_units"
        backend.last_units_kernel = self.units_kernel
        _record(backend._stream, backend._t0)

    def _stream(self) -> Any:
        """The stream the job queues on now: the compute stream, or a side or capturing one."""
        return self.b._stream if self._on is None else self._on

    def _launch(self, name: str, grid: int, args: Sequence[Arg], block: int = _THREADS) -> None:
        launch(self.mod.function(name), grid, block, self._stream(), args, what=name)

    def launch_units(self, first: int, end: int, stream: Any = None) -> None:
        """Unit kernels for units [first, end) on the compute stream, or on ``stream`` (a side
        stream of ``_side_streams``, whose work the caller joins into the compute stream before
        ``finish``). Each unit writes only its own slots of the scratch, so launches of disjoint
        unit ranges may run concurrently."""
        if end <= first:
            return
        self._on = stream
        try:
            self._launch_units(first, end)
        finally:
            self._on = None

    def _launch_units(self, first: int, end: int) -> None:
        data, n = (U64, self.ptr), (U64, self.n)
        if self.algorithm == SHA256_TREE_V1:
            if self.split:
                args = [data, n, (U64, first), (U64, self.sub)]
                self._launch("sha256_tree_units_split", 8 * (end - first), args, block=32)
            else:
                self._launch(self.units_kernel, end - first, [data, n, (U64, first), (U64, self.cv)])
            return
        if self.b3_split:
            # Units [first, end) are pieces [8 first, 8 end), the last unit's clipped to the
            # message (an empty message is one piece: one empty chunk).
            per = UNIT_SIZE // _B3_PIECE
            lo, hi = first * per, min(end * per, self.nodes)
            if hi > lo:
                args = [data, n, (U64, lo), (U64, self.cv)]
                self._launch("blake3_units_split", hi - lo, args, block=_B3_PIECE_THREADS)
            return
        unit_out = self.unit_digests if self.want_units else 0
        if self.want_units and self.units > 1:
            # Unit 0 shares the tree's counters (one pass, two tops); later units need both sets.
            if first == 0:
                self._launch("blake3_units", 1, [data, n, (U64, 0), (U64, self.cv), (U64, unit_out)])
                first = 1
            if end > first:
                self._launch(
                    "blake3_units_standalone",
                    end - first,
                    [data, n, (U64, first), (U64, self.cv), (U64, unit_out)],
                )
            return
        self._launch("blake3_units", end - first, [data, n, (U64, first), (U64, self.cv), (U64, unit_out)])

    def _join_split(self) -> None:
        """Split mode: reduce each unit's eight subtree nodes to its unit digest."""
        last_len = self.n - (self.units - 1) * UNIT_SIZE
        last_leaves = max(1, -(-last_len // LEAF_SIZE))
        count = 8 * (self.units - 1) + -(-last_leaves // 32)
        args: list[Arg] = [(U64, self.sub), (U32, count), (U32, 8), (U64, self.cv)]
        self._launch("sha256_tree_reduce", self.units, args, block=32)

    def _reduce(self) -> int:
        """Device address of the 32-byte root node (sha256-tree-v1: R; blake3: the digest)."""
        if self.nodes == 1:
            return self.cv
        # blake3 pieces reduce exactly as units do: both are aligned power-of-two runs of chunks
        # (the last one partial), i.e. subtrees of BLAKE3's left-complete tree.
        return _reduce_chain(
            self._stream(), self.mod, self.algorithm, self.cv, self.nodes, self.ping, self.pong, self.root
        )

    def _queue_tail(self) -> int:
        """Queue what follows the unit kernels (split mode's join, the reduction) on the job's
        stream; the device address of the root node."""
        if self.split:
            self._join_split()
        return self._reduce()

    def _host_bytes(self) -> int:
        """Bytes of the pinned result buffer this job's copies fill: the root, unit digests."""
        return 32 + (32 * self.units if self.want_units else 0)

    def _queue_copies(self, root_dev: int, host: PinnedHostBuffer) -> None:
        """Queue the copies of the root (and unit digests) into ``host`` on the job's stream."""
        drv = driver()
        stream = self._stream().handle
        check(drv.cuMemcpyDtoHAsync(host.address, root_dev, 32, stream), "cuMemcpyDtoHAsync")
        nunits = self._host_bytes() - 32
        if nunits:
            if self.b3_split:
                src = root_dev  # one unit (see __init__): its unit digest is the digest
            elif self.algorithm == SHA256_TREE_V1:
                src = self.cv
            else:
                src = self.unit_digests
            check(drv.cuMemcpyDtoHAsync(host.address + 32, src, nunits, stream), "cuMemcpyDtoHAsync")

    def graph_key(self, host: PinnedHostBuffer, *, tail_only: bool = False) -> tuple[object, ...]:
        """This job's ``GraphCache`` key (``digest_graph_key``) with ``host`` as result buffer."""
        return digest_graph_key(
            self.algorithm,
            self.ptr,
            self.n,
            self.want_units,
            self.split,
            self.b3_split,
            self.units_kernel,
            self.cv,  # the scratch base: every other scratch address is an offset from it
            host.address,
            tail_only=tail_only,
        )

    def _graph_run(self, graphs: GraphCache, host: PinnedHostBuffer, *, tail_only: bool) -> None:
        """Queue the job's work (with ``tail_only`` only what follows the unit kernels) through
        the lane's graph cache, then the end timing event. What is queued reads nothing that
        the host writes per call: the data and the scratch are device memory at the addresses of
        the key, and the results land in ``host`` at its address in the key."""
        b = self.b

        def enqueue(stream: Any) -> None:
            # Only queues work (no synchronization, no result read): it may run on a capturing
            # stream. The host decisions (kernels, levels) were all made in __init__.
            self._on = stream
            try:
                if not tail_only and self.units:
                    self._launch_units(0, self.units)
                self._queue_copies(self._queue_tail(), host)
            finally:
                self._on = None

        graphs.run(self.graph_key(host, tail_only=tail_only), b._stream, enqueue)
        _record(b._stream, b._t1)

    def run(
        self, graphs: GraphCache, while_running: WhileRunning | None = None
    ) -> tuple[bytes, HashResult | None]:
        """The whole digest (the ``digest``/``hash`` path, ``GRAPHS`` on): unit kernels,
        reduction and copies queued directly or, for a key seen before, as one graph launch;
        then as :meth:`finish`. The device time then spans the result copies as well."""
        host = self.b._result_buffer(self._host_bytes())
        self._graph_run(graphs, host, tail_only=False)
        return self._complete(host, while_running)

    def finish(
        self, while_running: WhileRunning | None = None, *, graphs: GraphCache | None = None
    ) -> tuple[bytes, HashResult | None]:
        """Queue the reduction and the copy back (through ``graphs`` when given: the seal path's
        tail), run ``while_running`` (see ``CudaBackend.digest_many``), wait, and return the
        digest (and unit digests)."""
        b = self.b
        host = b._result_buffer(self._host_bytes())
        if graphs is not None:
            self._graph_run(graphs, host, tail_only=True)
        else:
            root_dev = self._queue_tail()
            _record(b._stream, b._t1)
            self._queue_copies(root_dev, host)
        return self._complete(host, while_running)

    def _complete(
        self, host: PinnedHostBuffer, while_running: WhileRunning | None
    ) -> tuple[bytes, HashResult | None]:
        """Run ``while_running``, wait for the stream, and read the results from ``host``."""
        b = self.b
        _overlap(while_running, lambda: b._sync(b._stream, "digest kernels"))
        b.last_device_seconds = _elapsed_seconds(b._t0, b._t1)
        root = bytes(host.view[:32])
        if self.algorithm == SHA256_TREE_V1:
            # Spec step 5: D = SHA-256(R || LE64(n) || "sha256-tree-v1" || 0x02).
            digest = hashlib.sha256(root + self.n.to_bytes(8, "little") + _TREE_NAME + b"\x02").digest()
        else:
            digest = root
        if not self.want_units:
            return digest, None
        nunits = self._host_bytes() - 32
        return digest, HashResult(digest, bytes(host.view[32 : 32 + nunits]))


def _reduce_chain(
    stream: Any, mod: Module, algorithm: str, src: int, count: int, ping: int, pong: int, dst: int
) -> int:
    """Reduce ``count`` >= 2 nodes at ``src`` to one at ``dst``: groups of 256 per block per launch,
    alternating between the two level buffers (each with room for ceil(count / 256) nodes). For
    blake3 the last launch sets ROOT on the final parent."""
    blake = algorithm == BLAKE3
    fn = mod.function("blake3_reduce" if blake else "sha256_tree_reduce")

    def args(s: int, c: int, last: bool, d: int) -> list[Arg]:
        # blake3_reduce(in, count, root, out); sha256_tree_reduce(in, count, group, out)
        return [(U64, s), (U32, c), (U32, (1 if last else 0) if blake else _GROUP), (U64, d)]

    level = 0
    while count > _GROUP:
        grid = -(-count // _GROUP)
        out = ping if level % 2 == 0 else pong
        launch(fn, grid, _THREADS, stream, args(src, count, False, out), what="tree reduction")
        src, count, level = out, grid, level + 1
    launch(fn, 1, _THREADS, stream, args(src, count, True, dst), what="tree reduction")
    return dst


@dataclass(slots=True)
class TableColumns:
    """A checked segment table as columns (``CudaBackend._table_columns``)."""

    bufs: list[CudaBuffer]
    ptrs: list[int]
    lens: list[int]
    algs: list[str]
    #: Key material (nh-fast-v1 shard keys, attestation probe keys): never shown in a repr.
    keys: list[bytes | None] = field(repr=False)


@dataclass(slots=True, eq=False)
class _PreparedTable:
    """A checked segment table (``CudaBackend._prepared_table``)."""

    segments: tuple[Segment, ...]
    cols: TableColumns
    #: The distinct buffers in lock order (by id).
    bufs: list[CudaBuffer]
    algs: frozenset[str]
    #: The lane's plan-cache key columns (unkeyed tables), or None to build them per call.
    plan_key: tuple[tuple[Any, ...], ...] | None


class _Lane:
    """Where segment-table digests run: a stream, its lock, a device arena (tables, results and
    tree levels) and a pinned host buffer (the table image going up, the results coming down).

    The normal lane shares the compute stream and lock of the single-segment path. The low lane
    (scrubbing) has a stream of the lowest priority, a lock and buffers of its own, and waits
    (``LOW_WAIT``) without holding the GIL or a core.
    """

    def __init__(self, backend: CudaBackend, *, low: bool) -> None:
        self.b = backend
        self.low = low
        self.arena_ptr = 0
        self.arena_size = 0
        self.arena_mem: Any = None
        self.host: PinnedHostBuffer | None = None
        self._plans: OrderedDict[Any, tuple[int, _batch.Plan]] = OrderedDict()
        if low:
            # The least priority of the context's range (cuda.core's default when no priority is
            # given: the ``least`` of cuCtxGetStreamPriorityRange, as before).
            self.stream = _stream(backend._dev, None)
            self.lock: threading.RLock | Any = threading.RLock()
            self.owns_stream = True
        else:
            self.stream = backend._stream
            self.lock = backend._lock
            self.owns_stream = False
        #: The wait this lane does (LOW_WAIT when it was built): its event is made for it, so a
        #: later change of LOW_WAIT never makes a blocking wait on an event that spins.
        self.blocking_wait = low and LOW_WAIT == "block"
        self.done = _event(backend._dev, timing=False, blocking=self.blocking_wait)
        self.graphs = backend._graphs if not low else GraphCache(gate=backend._capture_gate)
        self.t0 = _event(backend._dev, timing=True)
        self.t1 = _event(backend._dev, timing=True)

    def plan(
        self,
        cols: TableColumns,
        want_units: bool,
        pick: Callable[[_batch.TableAlgorithm, int], str],
        key_columns: tuple[tuple[Any, ...], ...] | None = None,
    ) -> _batch.Plan:
        """The plan for these segments, reused when the same table comes again on this lane with
        the arena where it was (a model verified again and again: planning 150 tensors costs
        about 0.2 ms of Python, a fifth of a blake3 pass over 1.9 GB). The tables are uploaded
        again on every run all the same: what was planned on the host is what the kernels read,
        whatever happened to device memory in between.

        The cache key leaves the keys' bytes out (each segment names its key by first
        appearance): an attestation's probe table has a fresh key per nonce, and planning its
        16,384 units of a 16 GiB shard again each time cost ~1.5 ms on the H200's host. The keys
        are written into the reused plan's upload image (their records lead it, in
        first-appearance order, as ``build_plan_columns`` lays them out)."""
        order: dict[bytes, int] = {}
        key: tuple[Any, ...]
        if key_columns is not None:
            # An unkeyed table's columns as tuples, built once (``_prepared_table``).
            key = (want_units, *key_columns)
        else:
            if cols.keys.count(None) == len(cols.keys):
                shape: tuple[int | None, ...] = tuple(cols.keys)  # type: ignore[arg-type]
            else:
                shape = tuple(None if k is None else order.setdefault(k, len(order)) for k in cols.keys)
            # Keyed by the columns as tuples (copies in C; their hash is what a lookup costs).
            key = (want_units, tuple(cols.ptrs), tuple(cols.lens), tuple(cols.algs), shape)
        hit = self._plans.get(key)
        if hit is not None and hit[0] == self.arena_ptr and self.arena_size >= hit[1].arena_bytes:
            self._plans.move_to_end(key)
            plan = hit[1]
            for k, i in order.items():
                plan.upload[32 * i : 32 * i + 32] = np.frombuffer(k, dtype=np.uint8)
            return plan
        plan = _batch.build_plan_columns(
            cols.ptrs, cols.lens, cols.algs, cols.keys, want_units, self.arena, pick
        )
        self._plans[key] = (self.arena_ptr, plan)
        while len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)
        return plan

    def arena(self, nbytes: int) -> int:
        """Device address of at least ``nbytes`` of scratch (grown, never shrunk: hashing in the
        steady state allocates nothing). About 150 bytes per MiB hashed, plus tree levels."""
        if nbytes > self.arena_size:
            mr = self.b._scratch_mr
            if self.arena_mem is not None:
                self.graphs.invalidate()  # graphs name the arena (see CudaBackend._scratch)
                # The free zeroes the arena on the compute stream, which the low lane's stream
                # is not ordered with: work of this lane still in flight (a call that failed or
                # was interrupted before its synchronization) must be done first.
                _drain(self.stream)
                mem, self.arena_mem = self.arena_mem, None
                self.arena_ptr, self.arena_size = 0, 0
                mr.free(mem)
            size = max(1 << 16, -(-nbytes // 4096) * 4096)
            try:
                mem = mr.allocate(size)
            except CuMemAllocFailed as exc:
                if exc.name == OUT_OF_MEMORY:
                    raise InsufficientVram(
                        size, self.b.mem_info()[0], "insufficient VRAM for segment tables"
                    ) from exc
                raise _driver.map_name(exc.name, "cuMemAlloc (segment tables)") from exc
            self.arena_mem = mem
            self.arena_ptr, self.arena_size = int(mem.handle), size
        return self.arena_ptr

    def _pinned(self, nbytes: int) -> PinnedHostBuffer:
        if self.host is None or self.host.size < nbytes:
            if self.host is not None:
                self.graphs.invalidate()  # graphs copy from and into it (see CudaBackend._scratch)
                old, self.host = self.host, None  # forgotten first (see CudaBackend._result_buffer)
                _drain(self.stream)  # no copy of this lane may still read or fill it (same place)
                old.close()
            self.host = PinnedHostBuffer(max(64 << 10, -(-nbytes // (64 << 10)) * (64 << 10)), self.b._dev)
        return self.host

    def run(
        self,
        plan: _batch.Plan,
        fns: Mapping[tuple[str, str], Any],
        while_running: WhileRunning | None = None,
    ) -> bytes:
        """Upload the tables, launch every kernel of the plan, copy the results back, run
        ``while_running`` (see ``CudaBackend.digest_many``): one synchronization. Returns
        ``plan.download_bytes`` from ``plan.download_offset``."""
        b = self.b
        up = plan.upload
        host: PinnedHostBuffer | None = None
        base = self.arena_ptr
        try:
            # Inside the try: a pinned buffer that cannot be had (or grown) must still leave no
            # key record in the plan's image, which the plan cache keeps.
            host = self._pinned(max(up.nbytes, plan.download_bytes))
            host.array[: up.nbytes] = up
            _record(self.stream, self.t0)
            if GRAPHS:
                # A table that comes again at the same addresses (a model verified again and
                # again, a scrub chunk) is one graph launch. The graph's first node copies the
                # upload image from the pinned buffer when it runs: the descriptors and keys
                # just written there are what the kernels read, never values of the capture.
                key = ("table", self.low, plan.signature(), base, host.address)
                self.graphs.run(key, self.stream, lambda s: self._enqueue(plan, fns, host, base, s))
                _record(self.stream, self.t1)
            else:
                self._enqueue(plan, fns, host, base, self.stream, t1=self.t1)
            _overlap(while_running, self._wait)
            # Read before the finally clause zeroes the key records: the download landed at the
            # start of the same pinned buffer, over the upload image (keys first).
            out = bytes(host.view[: plan.download_bytes])
        except BaseException:
            # A launch or copy that failed to queue: what was queued may still read the pinned
            # buffer or write into it; let it finish before the buffer is zeroed or reused (a
            # broken context fails this too, and then nothing is in flight).
            if host is not None:
                with contextlib.suppress(Exception):
                    self.stream.sync()
            raise
        finally:
            if plan.key_bytes:
                # Key records (keyed BLAKE3): the device has read them by now (or never will:
                # a failed run synchronized in _overlap or raised before queuing the copy).
                if host is not None:
                    host.array[: plan.key_bytes] = 0
                up[: plan.key_bytes] = 0
        b.last_device_seconds = _elapsed_seconds(self.t0, self.t1)
        return out

    def _enqueue(
        self,
        plan: _batch.Plan,
        fns: Mapping[tuple[str, str], Any],
        host: PinnedHostBuffer,
        base: int,
        stream: Any,
        *,
        t1: Any = None,
    ) -> None:
        """Queue a run's upload, kernels and download on ``stream`` (the lane's, or a capturing
        one: nothing here waits or reads a result); ``t1``: the end timing event, recorded
        before the download (direct runs; a graph's run records it after the launch)."""
        drv = driver()
        handle = stream.handle  # cuda-bindings for the copies (byte ranges, see _copy_in)
        if plan.upload.nbytes:
            check(drv.cuMemcpyHtoDAsync(base, host.address, plan.upload.nbytes, handle), "cuMemcpyHtoDAsync")
        for group in [plan.unit_launches, *plan.level_launches]:
            for job in group:
                fn = fns[job.algorithm, job.kernel]
                launch(fn, job.count, _THREADS, stream, [(U64, base + job.table)], what=job.kernel)
        if t1 is not None:
            _record(stream, t1)
        check(
            drv.cuMemcpyDtoHAsync(host.address, base + plan.download_offset, plan.download_bytes, handle),
            "cuMemcpyDtoHAsync",
        )

    def _wait(self) -> None:
        if not self.low:
            b = self.b
            b._sync(self.stream, "segment-table digests")
            return
        _record(self.stream, self.done)
        if self.blocking_wait:
            # cuda.core's Event.sync (cuEventSynchronize) without the GIL, and the event's
            # blocking synchronization puts the thread to sleep until the GPU signals: the
            # engine's threads keep the interpreter for the whole wait (checked on the H200 by
            # tests/gpu/test_cuda_gpu_batch.py: another thread's loop keeps its pace meanwhile).
            _event_sync(self.done, "segment-table digests (low priority)")
            return
        delay = 20e-6
        while True:
            # Event.is_done is cuEventQuery: True when done, False while not ready, and any other
            # result raised (mapped by core_errors as before).
            with core_errors("segment-table digests (low priority)"):
                if self.done.is_done:
                    return
            time.sleep(delay)  # releases the GIL: the engine's Python threads run meanwhile
            delay = min(delay * 2, 1e-3)

    def close(self) -> None:
        # As before, teardown reports nothing.
        quiet = contextlib.suppress(Exception)
        if self.owns_stream:
            with quiet:
                self.stream.sync()
            self.graphs.close()  # the low lane's own (the normal lane's are the backend's)
        if self.arena_mem is not None:
            mem, self.arena_mem = self.arena_mem, None
            self.arena_ptr, self.arena_size = 0, 0
            with quiet:
                self.b._scratch_mr.free(mem)
        if self.host is not None:
            self.host.close()
            self.host = None
        for ev in (self.done, self.t0, self.t1):
            with quiet:
                ev.close()
        if self.owns_stream:
            with quiet:
                self.stream.close()
