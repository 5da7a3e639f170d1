"""The device-memory interface every backend implements.

A backend owns exact allocations on one device and can digest them *where they are*: the host
backend reads its emulated memory in place; the CUDA backend runs kernels over VRAM and copies
back only the 32-byte digests. Nothing above this layer ever sees a raw pointer.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from typing_extensions import Buffer

from vram_residency.errors import IntegrityViolation, InvalidInput, UnsupportedOperation
from vram_residency.formats.tree import UNIT_SIZE, HashResult

__all__ = [
    "ALIGNMENT",
    "COPY_CHUNK",
    "Backend",
    "Capabilities",
    "DeviceBuffer",
    "HostMemory",
    "LandedHook",
    "PlainHostMemory",
    "Priority",
    "Segment",
    "WhileRunning",
    "check_range",
    "progressive_chunks",
]

#: How urgent a segment table is. ``"low"`` is background work (the scrubber): a GPU backend with
#: ``Capabilities.priority_streams`` runs it on a low-priority stream so that serving kernels go
#: first; the host backend runs it on one thread; a backend without either ignores it.
Priority = Literal["normal", "low"]

#: ``while_running()``: host work a caller of ``Backend.digest_many`` has the backend run while
#: the device works (see there): called once, with the digests queued and not yet waited for.
#: It takes no device memory and must not touch the table's buffers (the backend holds their locks).
WhileRunning = Callable[[], None]

#: Allocations are rounded up to this many bytes (cudaMalloc's guarantee, kept on every backend
#: so that kernels can use 16-byte vector loads on any shard).
ALIGNMENT: Final = 256

_MAX_OFFSET: Final = (1 << 63) - 1

#: Copies between devices and to or from host memory move this many bytes at a time: a multiple
#: of the 1 MiB unit, so that every chunk but the last holds whole units the destination can hash
#: as soon as the chunk lands, and large enough that per-chunk overhead stays in the noise.
COPY_CHUNK: Final = 64 * UNIT_SIZE

#: ``hook(target, offset, length)``: called after a chunk of a copy has landed in ``target`` (the
#: destination device buffer, or the host memory of an offload) and before it is hashed. It exists
#: for fault injection only (tests, the GPU corruption trials): a hook that changes the landed
#: bytes plays a transfer that corrupted them. Production callers pass None.
LandedHook = Callable[["DeviceBuffer | memoryview", int, int], None]


#: ``progressive_chunks``' defaults (``Backend.allocate_progressive``). The first chunk is small so
#: that the copy starts at once (32 MiB: ~0.6 ms of copy at 55 GB/s); each next one doubles, so
#: that creating chunk k+1 hides behind the copy of chunk k, which grows; the cap bounds what one
#: failure or one driver call holds. A 2 GiB shard maps in 8 chunks (32, 64, 128, 256 MiB, then
#: 4 of 392 MiB), where 32 chunks of 64 MiB cost 35 ms of host time (~1.1 ms each, read as a
#: per-call cost: H200, 2026-11-30), about the whole 39 ms copy. The migrate bench's chunk log
#: separates per-call from per-byte cost on the GPU.
PROGRESSIVE_FIRST_CHUNK: Final = 32 << 20
PROGRESSIVE_MAX_CHUNK: Final = 512 << 20


def progressive_chunks(
    total: int, granularity: int, first: int = PROGRESSIVE_FIRST_CHUNK, cap: int = PROGRESSIVE_MAX_CHUNK
) -> list[int]:
    """The sizes of the chunks a progressive allocation of ``total`` bytes maps, in order.

    ``total`` must be a positive multiple of ``granularity`` (the caller rounds it). ``first``
    and ``cap`` are rounded to the granularity (``first`` up, ``cap`` down, at least one
    granularity each; ``first`` at most ``cap``). The result covers ``total`` exactly, every
    chunk a multiple of ``granularity``, never larger than the cap, never smaller than the chunk
    before it (a small chunk late in the copy would cost a whole driver call's overhead for
    little copy to hide it behind), the first one ``first`` (or, for a total below twice that,
    the whole total, or near-equal parts of it under the cap).

    How: chunks of ``first``, ``2 first``, ``4 first``... are taken while the rest stays at
    least as large as the chunk just taken and the chunk is at most half the cap; the rest is
    then cut into the fewest near-equal parts under the cap (the larger ones last). Each of
    those parts is over half the cap, so at least the last doubling chunk: sizes never fall."""
    for name, v in (("total", total), ("granularity", granularity), ("first", first), ("cap", cap)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InvalidInput(f"{name} must be a positive integer")
    if total % granularity:
        raise InvalidInput(f"total ({total}) must be a multiple of the granularity ({granularity})")
    # Everything in granularity units from here on.
    t = total // granularity
    c = max(1, cap // granularity)
    s = min(-(-first // granularity), c)
    out: list[int] = []
    while 2 * s <= c and t - s >= s:
        out.append(s)
        t -= s
        s *= 2
    parts = -(-t // c)
    base, extra = divmod(t, parts)
    out += [base] * (parts - extra) + [base + 1] * extra
    return [u * granularity for u in out]


def check_range(size: int, offset: int, n: int) -> None:
    """Bounds and overflow check of ``[offset, offset + n)`` against a buffer of ``size`` bytes.

    Python integers do not overflow, but the values travel on to 64-bit driver calls: reject
    anything that would not fit, and anything negative.
    """
    for name, v in (("offset", offset), ("length", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidInput(f"{name} must be an integer")
        if v < 0 or v > _MAX_OFFSET:
            raise InvalidInput(f"{name} out of range: {v}")
    if offset + n > size:
        raise InvalidInput(f"range [{offset}, {offset + n}) exceeds buffer of {size} bytes")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond the common interface, declared instead of probed.

    Callers branch on these flags, never on ``getattr`` or on the backend's name."""

    #: Device memory is host RAM (the host backend): shown wherever the backend is shown.
    emulated: bool
    #: ``DeviceBuffer.host_view()`` gives the memory itself as a memoryview (no copy).
    host_view: bool
    #: ``DeviceBuffer.device_pointer`` is a device address (CUDA executors, DLPack consumers).
    device_pointer: bool
    #: ``Backend.adopt_host`` / ``Backend.adopt_pointer`` wrap memory someone else owns.
    adopt_host: bool
    adopt_pointer: bool
    #: ``Backend.hash_many``/``digest_many`` run a whole segment table in one pass (one launch or
    #: a few, one synchronization) rather than one segment after another.
    batched_digests: bool
    #: ``hash_many``/``digest_many`` honour ``priority="low"`` on the device (a low-priority stream).
    priority_streams: bool = False
    #: ``Backend.allocate_progressive``: a buffer whose memory is created and mapped chunk by chunk
    #: as a copy into it advances (``DeviceBuffer.map_through``), so that allocating overlaps the
    #: copy (restore from host memory; CUDA's virtual memory management).
    progressive_allocation: bool = False


@dataclass(frozen=True, slots=True)
class Segment:
    """One entry of a segment table: digest the first ``length`` bytes of ``buf`` under
    ``algorithm``, keyed by ``key`` where the algorithm takes one (``blake3`` with a 32-byte key is
    BLAKE3's keyed mode, the attest-v1 probe; keyed algorithms such as ``nh-fast-v1`` need one)."""

    buf: DeviceBuffer
    length: int
    algorithm: str
    #: Key material (a shard's nh-fast-v1 key, an attestation's probe key): never shown in a
    #: repr, which tables reach through tracebacks with locals, debug logs and the plans holding them.
    key: bytes | None = field(default=None, repr=False)


class HostMemory(abc.ABC):
    """Host memory a backend hands out for copies to and from its device (``allocate_host``):
    page-locked on CUDA, so that the copy engines reach it directly; plain memory elsewhere."""

    @property
    @abc.abstractmethod
    def view(self) -> memoryview:
        """The memory as a writable byte view (invalid after ``close``)."""

    @property
    def size(self) -> int:
        return len(self.view)

    @abc.abstractmethod
    def close(self) -> None:
        """Zero and release the memory. Idempotent."""

    def closing_soon(self) -> None:  # noqa: B027 - optional hook
        """Say, on the caller's thread, that ``close`` is about to run on another thread (a
        restore discards its host copy in the background). A backend that pools host memory
        lets an allocation made meanwhile wait for this memory instead of making new memory."""


class PlainHostMemory(HostMemory):
    """Ordinary host memory (a bytearray), for backends without pinned memory."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidInput("host memory size must be a positive integer")
        self._data: bytearray | None = bytearray(size)
        self._view = memoryview(self._data)

    @property
    def view(self) -> memoryview:
        if self._data is None:
            raise IntegrityViolation("host memory used after it was released")
        return self._view

    def close(self) -> None:
        if self._data is not None:
            # Offloaded model bytes do not linger in freed heap memory.
            self._view[:] = bytes(len(self._data))
            self._view.release()
            self._data = None


class DeviceBuffer(abc.ABC):
    """One exact allocation of ``size`` usable bytes on ``device``.

    ``write`` and ``read`` are bounds- and overflow-checked. ``close`` zeroes the memory, then
    frees it; it is idempotent, and every other method raises IntegrityViolation after it.
    """

    def __init__(self, size: int, device: int) -> None:
        self._size = size
        self._device = device
        self._closed = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> int:
        return self._device

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def adopted(self) -> bool:
        """True when the memory belongs to someone else (``close`` forgets it, never frees it)."""
        return False

    @property
    def device_pointer(self) -> int:
        """The device address of the allocation (``Capabilities.device_pointer``). Raises
        UnsupportedOperation on backends without one, IntegrityViolation once freed."""
        raise UnsupportedOperation(f"{type(self).__name__} has no device pointer")

    def host_view(self, length: int | None = None) -> memoryview:
        """The memory itself as bytes, in place (``Capabilities.host_view``): what lets a CPU
        executor run on the very bytes that were verified. UnsupportedOperation elsewhere."""
        raise UnsupportedOperation(f"{type(self).__name__} has no host view")

    @property
    def mapped(self) -> int:
        """How many bytes from the start are backed by memory: ``size``, except for a buffer from
        ``Backend.allocate_progressive`` whose chunks are still being mapped (``map_through``)."""
        return self._size

    def check_open(self) -> None:
        """Raise IntegrityViolation once the buffer was freed, or while part of it is not mapped
        yet (backends check before device work: a progressive buffer is digested, checked
        against the policy, read by peers or handed out by pointer only once it is whole)."""
        if self._closed:
            raise IntegrityViolation("device buffer used after it was freed")
        if self.mapped < self._size:
            raise IntegrityViolation("device buffer used before all of its memory was mapped")

    _check_open = check_open  # the subclasses' own spelling

    def check_mapped(self, end: int) -> None:
        """Open, and ``[0, end)`` mapped: what a write or read of a buffer still being mapped
        needs (a restore writes each chunk as soon as it is mapped; its fault-injection hook
        reads back what landed)."""
        if self._closed:
            raise IntegrityViolation("device buffer used after it was freed")
        if end > self.mapped:
            raise IntegrityViolation(f"device buffer range ending at {end} is not mapped yet")

    def map_through(self, end: int) -> None:
        """Make sure ``[0, end)`` is backed by memory. A no-op on an ordinary allocation (mapped
        whole); on a progressive one (``Backend.allocate_progressive``) it creates and maps the
        chunks up to ``end``. If that fails (out of memory at chunk k), everything the buffer had
        created is zeroed and released at once and the backend's allocation error (InsufficientVram,
        CudaAllocationFailed) is raised; the buffer is then unusable and ``close`` only forgets it."""
        check_range(self._size, 0, end)
        if self._closed:
            raise IntegrityViolation("device buffer used after it was freed")
        if end > self.mapped:
            self._map_more(end)

    def map_chunk_at(self, offset: int) -> int:
        """Map the chunk holding byte ``offset`` (and every chunk before it, as ``map_through``);
        returns the end of the mapped prefix (``mapped``). A copy into a progressive buffer
        queues at most up to that end before it asks for the next chunk: mapping chunk k+1
        before chunk k's copy is queued would put the two in a row instead of side by side."""
        check_range(self._size, offset, 1)
        self.map_through(offset + 1)
        return self.mapped

    def _map_more(self, end: int) -> None:
        """Map chunks until ``[0, end)`` is mapped (progressive buffers override it)."""
        raise IntegrityViolation("an ordinary device buffer is mapped whole; nothing to map")

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        check_range(self._size, offset, len(view))
        self.check_mapped(offset + len(view))
        if len(view):
            self._write(offset, view)

    def read(self, offset: int, n: int) -> bytes:
        check_range(self._size, offset, n)
        self.check_mapped(offset + n)
        return self._read(offset, n) if n else b""

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._free()

    @abc.abstractmethod
    def _write(self, offset: int, view: memoryview) -> None: ...

    @abc.abstractmethod
    def _read(self, offset: int, n: int) -> bytes: ...

    @abc.abstractmethod
    def _free(self) -> None:
        """Zero every byte, then release the memory."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._size} bytes on device {self._device}, {state}>"


class Backend(abc.ABC):
    """Device memory on one device: exact allocations, memory info, policy check, digests."""

    #: ``"host"`` or ``"cuda"``.
    name: str
    #: What this backend can do; see ``Capabilities``.
    capabilities: Capabilities

    def __init__(self, device: int) -> None:
        self.device = device

    @property
    def emulated(self) -> bool:
        return self.capabilities.emulated

    @abc.abstractmethod
    def allocate(self, size: int) -> DeviceBuffer:
        """An exact allocation of ``size`` bytes (1 <= size), zero-filled or not; never pooled,
        never managed or host memory. Raises InsufficientVram or CudaAllocationFailed, both
        retriable, and leaves nothing allocated on failure."""

    def allocate_progressive(self, size: int) -> DeviceBuffer:
        """``Capabilities.progressive_allocation``: a buffer of ``size`` bytes whose memory is
        created and mapped chunk by chunk by ``DeviceBuffer.map_through``, so that a copy into it
        can start after the first chunk and the rest is allocated while the copy runs. Until it
        is mapped whole it can be written and read only where mapped, and nothing else (digests,
        the policy check, pointers) accepts it. Its contents are not zero-filled: the caller
        writes every byte of ``[0, size)`` (restore does). Same plain device memory, same errors
        and same release (zeroed, then freed) as ``allocate``; a backend may hand out a buffer
        that is mapped whole from the start (a size too small to be worth chunking)."""
        raise UnsupportedOperation(f"the {self.name} backend has no progressive allocation")

    @abc.abstractmethod
    def mem_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes on the device."""

    @abc.abstractmethod
    def check_policy(self, buf: DeviceBuffer) -> None:
        """Raise PolicyViolation unless ``buf`` is plain device memory on this device."""

    @abc.abstractmethod
    def hash(
        self, buf: DeviceBuffer, algorithm: str, length: int | None = None, *, key: bytes | None = None
    ) -> HashResult:
        """Digest and unit digests of the first ``length`` bytes (default: all) of ``buf``,
        computed from the device memory itself (``key``: see ``Segment``)."""

    def digest(
        self, buf: DeviceBuffer, algorithm: str, length: int | None = None, *, key: bytes | None = None
    ) -> bytes:
        """The digest alone: the verify path. Backends override it when leaving out the unit
        digests saves work (on the GPU, BLAKE3's unit digests need a second pass)."""
        return self.hash(buf, algorithm, length, key=key).digest

    def hash_many(self, segments: Sequence[Segment], *, priority: Priority = "normal") -> list[HashResult]:
        """``hash`` of every segment, in order. Backends with ``batched_digests`` do it in one
        pass over a segment table; this default goes one segment after another. ``priority``:
        see ``Priority``."""
        return [self.hash(s.buf, s.algorithm, s.length, key=s.key) for s in segments]

    def digest_many(
        self,
        segments: Sequence[Segment],
        *,
        priority: Priority = "normal",
        while_running: WhileRunning | None = None,
    ) -> list[bytes]:
        """``digest`` of every segment, in order: the batched verify path (one launch or a few,
        one synchronization, on backends with ``batched_digests``). ``priority``: see
        ``Priority``.

        ``while_running``: host work for the caller to do while the device digests (the store
        checks a verify plan's tags meanwhile; see ``WhileRunning``). The backend calls it once,
        after every segment's device work is queued and before it waits for that work; a backend
        without asynchrony (this default, the host backend) calls it at any point of the call. A
        call that fails before queuing anything (a bad table, a freed buffer) does not call it.
        When it raises, the backend waits for and cleans up the queued work exactly as on any
        other error (nothing left in flight, no buffer reused early, every lock released), then
        re-raises its exception."""
        out = [self.digest(s.buf, s.algorithm, s.length, key=s.key) for s in segments]
        if while_running is not None:
            while_running()
        return out

    def adopt_host(self, memory: Buffer) -> DeviceBuffer:
        """Wrap host memory someone else owns, in place (``Capabilities.adopt_host``)."""
        raise UnsupportedOperation(f"the {self.name} backend cannot adopt host memory")

    def adopt_pointer(self, ptr: int, size: int) -> DeviceBuffer:
        """Wrap device memory someone else owns, in place (``Capabilities.adopt_pointer``)."""
        raise UnsupportedOperation(f"the {self.name} backend cannot adopt device pointers")

    def write_and_hash(
        self, buf: DeviceBuffer, data: Buffer, algorithm: str, *, key: bytes | None = None
    ) -> HashResult:
        """Seal path: copy ``data`` to the start of ``buf``, then digest those bytes *as they are
        in device memory* (``key``: see ``Segment``). Backends override it to overlap copying
        with hashing."""
        view = memoryview(data).cast("B")
        # Chunk by chunk, each mapped first: a progressive buffer (restore) is filled as its
        # memory comes; an ordinary one is mapped whole and map_through does nothing.
        for off in range(0, len(view), COPY_CHUNK):
            m = min(COPY_CHUNK, len(view) - off)
            buf.map_through(off + m)
            buf.write(off, view[off : off + m])
        return self.hash(buf, algorithm, len(view), key=key)

    # -- copies between devices and to and from host memory (migration, offload, restore) --------

    def allocate_host(self, size: int) -> HostMemory:
        """Host memory for copies to and from this device (pinned where the backend has it)."""
        return PlainHostMemory(size)

    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        """Device to host: copy ``len(out)`` bytes of ``buf`` from ``offset`` into ``out``."""
        out = out.cast("B") if out.format != "B" else out
        out[:] = buf.read(offset, len(out))

    def read_chunks(
        self, buf: DeviceBuffer, out: memoryview, on_chunk: Callable[[int, int], None] | None = None
    ) -> None:
        """Device to host: copy the first ``len(out)`` bytes of ``buf`` into ``out`` in
        ``COPY_CHUNK`` pieces, calling ``on_chunk(offset, length)`` once each piece has landed in
        ``out``. Backends with copy engines keep the later pieces in flight while ``on_chunk`` runs
        (the offload hashes each landed piece on the host while the next ones copy). ``on_chunk``
        must not touch ``buf``: the backend may hold its lock. When this returns or raises, no
        copy into ``out`` is still running."""
        out = out.cast("B") if out.format != "B" else out
        check_range(buf.size, 0, len(out))
        for off in range(0, len(out), COPY_CHUNK):
            m = min(COPY_CHUNK, len(out) - off)
            self.read_into(buf, off, out[off : off + m])
            if on_chunk is not None:
                on_chunk(off, m)

    def can_access_peer(self, other: Backend) -> bool:
        """True when ``copy_from`` copies from ``other``'s memory directly, device to device
        (peer to peer on CUDA); otherwise the bytes go through host memory."""
        return False

    def copy_from(
        self, dst: DeviceBuffer, src_backend: Backend, src: DeviceBuffer, offset: int, length: int
    ) -> None:
        """Copy ``[offset, offset + length)`` of ``src`` (on ``src_backend``) to the same range of
        ``dst`` (on this backend). This default goes through host memory, one chunk at a time."""
        check_range(src.size, offset, length)
        check_range(dst.size, offset, length)
        if not length:
            return
        stage = src_backend.allocate_host(min(length, COPY_CHUNK))
        try:
            for off in range(offset, offset + length, COPY_CHUNK):
                m = min(COPY_CHUNK, offset + length - off)
                piece = stage.view[:m]
                src_backend.read_into(src, off, piece)
                dst.write(off, piece)
        finally:
            stage.close()

    def copy_and_hash_from(
        self,
        dst: DeviceBuffer,
        src_backend: Backend,
        src: DeviceBuffer,
        length: int,
        algorithm: str,
        *,
        on_landed: LandedHook | None = None,
        key: bytes | None = None,
    ) -> HashResult:
        """Migration path: copy the first ``length`` bytes of ``src`` to ``dst`` chunk by chunk and
        return the digest and unit digests *of what landed in* ``dst``, computed by this backend
        (``key``: see ``Segment``). Backends override it to hash each chunk's units as soon as
        the chunk lands."""
        check_range(src.size, 0, length)
        check_range(dst.size, 0, length)
        for off in range(0, length, COPY_CHUNK):
            m = min(COPY_CHUNK, length - off)
            self.copy_from(dst, src_backend, src, off, m)
            if on_landed is not None:
                on_landed(dst, off, m)
        return self.hash(dst, algorithm, length, key=key)

    def describe(self) -> str:
        """One human line: what this backend is (and that it is an emulation, where it is)."""
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources (streams, modules, staging buffers)."""
