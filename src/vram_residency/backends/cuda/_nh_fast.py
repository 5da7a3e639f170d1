"""Launch plumbing for ``nh-fast-v1`` (``kernels/nh_fast.cu``, ``docs/specs/nh-fast-v1.md``).

For the CUDA backend's dispatch. Two levels:

- :class:`NhFastJob`: one digest computation on a given module, stream and scratch address. It
  uploads the key schedule, launches the leaf kernel over any leaf range (so the seal path can
  hash each staged chunk as soon as its copy lands), then the unit kernel. The seal path (which
  keeps the unit digests) copies them back and finishes the digest on the host (one keyed BLAKE3
  call over 32 bytes per MiB); the verify path finishes it on the device (``nhf_finalize``) and
  copies back 32 bytes: on an H200 at 16 GiB the host's copy and hash of the 512 KiB of unit
  digests took ~0.25 ms of a ~4.6 ms check.
- :func:`nh_fast_hash` (and :func:`nh_fast_many` for a table): the whole thing for a device
  pointer, through the CUDA backend's ``kernel_session()`` (:class:`Session`: its lock, compute
  stream, scratch buffer, pinned result buffer, timing events, modules and occupancy cache), on
  cuda.core like the backend's own digests: ``Stream.record``/``sync``, ``Event`` arithmetic,
  ``Module.blocks_per_sm``, and cuda-bindings copies of byte ranges on ``stream.handle``.

The key schedule is derived on the host (a 5 KiB BLAKE3 XOF output) and copied to the scratch
buffer in stream order, from a slice of the backend's pinned result buffer when the caller gives
one (an asynchronous copy: from pageable memory the driver stages it first, ~20-40 us measured on
the H200); it never appears in an error message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

from vram_residency.backends.cuda._core import core_errors, elapsed_seconds, record
from vram_residency.backends.cuda._driver import check, driver
from vram_residency.backends.cuda._graphs import GraphCache
from vram_residency.backends.cuda._kernels import U32, U64, Arg, Module, launch
from vram_residency.backends.cuda._staging import PinnedHostBuffer, host_address
from vram_residency.errors import IntegrityViolation, InvalidInput
from vram_residency.formats import nhfast
from vram_residency.formats.tree import LEAF_SIZE, UNIT_SIZE, HashResult, unit_count


class Session(Protocol):
    """What the launcher needs of the backend's compute lane: ``_backend.KernelSession`` (see
    there), described here rather than imported, so that the import graph stays acyclic
    (``_backend`` imports this module; tests/test_import_graph.py)."""

    @property
    def stream(self) -> Any: ...
    @property
    def t0(self) -> Any: ...
    @property
    def t1(self) -> Any: ...
    @property
    def multiprocessors(self) -> int: ...
    def module(self, source: str) -> Module: ...
    def kernel_defines(self, source: str) -> Mapping[str, str]: ...
    def blocks_per_sm(self, mod: Module, name: str, threads: int) -> int: ...
    def scratch(self, nbytes: int) -> int: ...
    def result_buffer(self, nbytes: int) -> PinnedHostBuffer: ...
    def temporary(self, nbytes: int) -> AbstractContextManager[int]: ...
    def copy_out(self, src: int, n: int) -> bytes: ...
    def wait(self) -> None: ...
    @property
    def graphs(self) -> GraphCache: ...


class Backend(Protocol):
    """What the launcher needs of ``_backend.CudaBackend``: its kernel session and the public
    figures of the last digest (for benchmarks)."""

    last_device_seconds: float
    last_scratch_bytes: int
    last_units_kernel: str

    def kernel_session(
        self, priority: str = ..., *, preload: Sequence[str] = ...
    ) -> AbstractContextManager[Session]: ...


__all__ = [
    "DEVICE_FINISH_UNITS",
    "FUSED_KERNEL",
    "FUSED_UNITS",
    "GRAPHS",
    "KEY_STAGE_BYTES",
    "SOURCE",
    "UNFUSED_KERNEL",
    "Backend",
    "NhFastJob",
    "Session",
    "key_trials",
    "launch_shape",
    "leaf_blocks",
    "module_for",
    "new_job",
    "nh_fast_digest",
    "nh_fast_digests",
    "nh_fast_hash",
    "nh_fast_many",
    "scratch_bytes",
]

#: Kernel source name (``kernels/nh_fast.cu``), as listed in ``_compile.KERNELS``.
SOURCE: Final = "nh_fast"
_THREADS: Final = 256  # NHF_THREADS
_CHUNKS_PER_UNIT: Final = 6  # 1 KiB BLAKE3 chunks of a full unit's 6144 bytes of leaf tags
_TOP_THREADS: Final = 32  # NHF_TOP_THREADS (nhf_top_chunks)
_FIN_THREADS: Final = 512  # NHF_FIN_THREADS
_KEY_OFF: Final = 0
_UNIT_KEY_OFF: Final = nhfast.NH_KEY_BYTES  # 5120
_TOP_KEY_OFF: Final = _UNIT_KEY_OFF + 32
_KEY_BLOB: Final = _TOP_KEY_OFF + 32  # bytes uploaded per job: NH key, unit key, top key
_TAGS_OFF: Final = 5376  # 256-byte aligned, after the keys
#: Bytes of pinned host memory a job's key upload needs (see ``NhFastJob``'s ``stage``).
KEY_STAGE_BYTES: Final = _TAGS_OFF
#: The verify path finishes a digest on the device (``nhf_top_chunks`` + ``nhf_finalize``) from
#: this many units (4 GiB) on, and on the host below. Measured on an H200: the host's copy and
#: keyed BLAKE3 of the unit digests cost ~15 us per 1,000 units (0.25 ms at 16 GiB); the device
#: finish is bound by its serial chain (16 compressions per 1 KiB chunk, then a level per
#: doubling): 26 us at 1,024 units and 34 us at 16,384 (2026-11-30; one block did it all before,
#: ~60 and ~120 us). At 1 GiB the host finish still won (a verify of 367 against 384 us, wall).
DEVICE_FINISH_UNITS: int = 4096  # not Final: tests and the sanitizer run set it to 1
#: The leaf kernel builds the unit digests itself (``nhf_leaf_tags_units``: the warp that counts a
#: unit's last leaf hashes its tag string), instead of ``nhf_leaf_tags`` followed by
#: ``nhf_units`` (on an H200 at 1 GiB the unit kernels of the time, two launches, were a ~40 us
#: serial tail after ~285 us of leaves). OFF: measured on the H200 (2026-11-29, same process,
#: alternating) the fused path took 1,741-1,768 us of device time at 1 GiB against 320-333 us for
#: the two-launch path: the warps that finish units stop streaming for a serial BLAKE3 chain while
#: their share of leaves waits, so the persistent grid's tail grows instead of shrinking. Kept,
#: tested bit-exact and sanitizer-clean, for the next attempt (split each compression over lanes).
#: Not Final: flip it (or pass ``fused=`` to the job) to A/B the two paths; a job reads it when it
#: is built. The kernel that ran is reported in the backend's ``last_units_kernel``.
FUSED_UNITS: bool = False
#: A table of rows (one shard's verify, a model's, a scrub chunk's) that comes again on a lane
#: with the same addresses runs as one CUDA graph launch (``_graphs.GraphCache``: captured on
#: its third call) instead of four to six calls per row. Not Final: benchmarks and tests A/B it.
GRAPHS: bool = True
FUSED_KERNEL: Final = "nhf_leaf_tags_units"
UNFUSED_KERNEL: Final = "nhf_units"


def _align(x: int) -> int:
    return -(-x // 256) * 256


def _leaves(n: int) -> int:
    return max(1, -(-n // LEAF_SIZE))


def scratch_bytes(n: int) -> int:
    """Device scratch an ``n``-byte shard needs: keys (5 KiB), 24 bytes per leaf, then per unit
    192 bytes of chunk chaining values and 32 of digest, then the length (8 bytes, padded to 16)
    and the 32-byte digest that ``nhf_finalize`` appends, then the fused kernel's leaf counters
    (4 bytes per unit). About 0.6% of the shard (the leaf tags), under the backend's 1% scratch
    budget."""
    units = unit_count(n)
    per_unit = 32 * _CHUNKS_PER_UNIT + 32 + 4  # chunk values, digest, leaf counter
    return _TAGS_OFF + _align(nhfast.TAG_SIZE * _leaves(n)) + per_unit * units + 16 + 32


def _top_chunks(units: int) -> int:
    """1 KiB BLAKE3 chunks of the top-level message: ``units`` unit digests and the LE64 length."""
    return -(-(32 * units + 8) // 1024)


def _finalize_work_bytes(units: int) -> int:
    """Bytes of work area ``nhf_finalize`` uses for ``units`` unit digests: two levels of 32-byte
    chaining values per 1 KiB chunk of the 32 * units + 8 byte message, none for one chunk."""
    chunks = _top_chunks(units)
    return 0 if chunks == 1 else 64 * chunks


def _job_layout(n: int) -> tuple[int, int, int, int, int]:
    """Offsets, from a job's scratch address, of its leaf tags, its chunk chaining values (also
    ``nhf_finalize``'s work area), its unit digests (followed by the LE64 length slot), the
    digest ``nhf_finalize`` writes, and the fused kernel's per-unit leaf counters (u32, 16-byte
    aligned); all inside :func:`scratch_bytes` (``n``). The counters have a region of their own:
    ``nhf_finalize``, which runs after the leaf kernel, uses the chunk values as its work area."""
    units = unit_count(n)
    tags = _TAGS_OFF
    cvs = tags + _align(nhfast.TAG_SIZE * _leaves(n))
    unit_out = cvs + 32 * _CHUNKS_PER_UNIT * units
    # nhf_finalize appends LE64(n) to the unit digests and writes the digest after it.
    digest_out = unit_out + 32 * units + 16
    return tags, cvs, unit_out, digest_out, digest_out + 32


def _host_layout(down: Sequence[int], rows: int) -> tuple[int, int]:
    """The pinned result buffer of a table of ``rows`` jobs: the copies back (``down`` bytes per
    row) from 0, then one key stage of :data:`KEY_STAGE_BYTES` per row from the first offset
    returned; the second is the buffer size. The stages never overlap the copies back: a row's
    key upload may still be reading its stage while an earlier row's digests land."""
    stage_at = _align(sum(down))
    return stage_at, stage_at + KEY_STAGE_BYTES * rows


class NhFastJob:
    """One nh-fast-v1 digest of the ``n`` bytes at device address ``ptr``, queued on ``stream``
    (a cuda.core ``Stream``).

    ``scratch``: a device address with :func:`scratch_bytes` (``n``) bytes the job may use until
    :meth:`finish` returns. ``leaf_blocks``: the leaf kernel's grid (streaming multiprocessors x
    resident blocks per SM is the natural choice; any value works). ``inflight``: the kernel's
    NHF_INFLIGHT (leaves per warp per round), used only to size small grids. ``stage``: pinned
    host memory of :data:`KEY_STAGE_BYTES` bytes (address, view) that stays untouched until the
    stream has run the job's upload (the callers' one synchronization); without it the key is
    copied from pageable memory. ``schedule``: ``nhfast.key_schedule(key)`` when the caller has
    derived it already (before queuing any device work, so that the derivation never sits
    between two launches); derived here otherwise.
    """

    def __init__(
        self,
        module: Module,
        stream: Any,
        ptr: int,
        n: int,
        key: bytes,
        scratch: int,
        *,
        leaf_blocks: int,
        inflight: int = 2,
        stage: tuple[int, memoryview] | None = None,
        fused: bool | None = None,
        schedule: nhfast.KeySchedule | None = None,
        units_per_block: int = 4,
    ) -> None:
        if ptr % 16:
            raise InvalidInput("nh-fast-v1 needs 16-byte aligned device memory (16-byte loads)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInput("length must be a non-negative integer")
        nhfast.check_key(key)
        sched = nhfast.key_schedule(key) if schedule is None else schedule
        self.mod = module
        self.stream = stream
        self.ptr = ptr
        self.n = n
        self.leaves = _leaves(n)
        self.units = unit_count(n)
        self._sched = sched
        self._key_dev = scratch + _KEY_OFF
        self._unit_key_dev = scratch + _UNIT_KEY_OFF
        self._top_key_dev = scratch + _TOP_KEY_OFF
        tags, cvs, unit_out, digest_out, counters = _job_layout(n)
        #: The unit digests come from the leaf kernel (``nhf_leaf_tags_units``); see FUSED_UNITS.
        self.fused = FUSED_UNITS if fused is None else bool(fused)
        self._counters = scratch + counters
        self._tags = scratch + tags
        self._cvs = scratch + cvs
        self._unit_out = scratch + unit_out
        self._digest_out = scratch + digest_out
        per_block = (_THREADS // 32) * max(1, inflight)
        self._grid_cap = max(1, int(leaf_blocks))
        self._per_block = per_block
        self._units_per_block = max(1, int(units_per_block))
        self._units_done = 0
        blob = sched.nh_key + sched.unit_key + sched.top_key
        if stage is not None:
            addr, view = stage
            if len(view) < len(blob):
                raise InvalidInput("key stage too small")
            view[: len(blob)] = blob
            keep = None
        else:
            addr, keep = host_address(memoryview(blob))
        # cuda-bindings for the copy (a byte range of scratch; cuda.core copies whole Buffers), on
        # the stream's handle. From pageable memory the call returns once the bytes are staged,
        # so `blob` may go; from the pinned stage the copy is asynchronous (see ``stage``).
        copy = driver().cuMemcpyHtoDAsync(self._key_dev, addr, len(blob), stream.handle)
        check(copy, "uploading the nh-fast-v1 key")
        del keep, blob
        if self.fused:
            # The fused kernel's leaf counters start at zero for this job: the scratch buffer is
            # shared with other digests (and a launch aborted earlier may have left counts), so
            # it is never assumed clean. In stream order, before any leaf launch.
            zero = driver().cuMemsetD32Async(self._counters, 0, self.units, stream.handle)
            check(zero, "clearing the nh-fast-v1 unit counters")

    @property
    def units_kernel(self) -> str:
        """The kernel that builds the unit digests (for ``backend.last_units_kernel``)."""
        return FUSED_KERNEL if self.fused else UNFUSED_KERNEL

    @property
    def units_done(self) -> int:
        """Units whose digests are queued so far."""
        return self._units_done

    @property
    def unit_out(self) -> int:
        """Device address of the unit digests (32 bytes per unit), valid until ``finish``."""
        return self._unit_out

    @property
    def schedule(self) -> nhfast.KeySchedule:
        return self._sched

    @property
    def digest_out(self) -> int:
        """Device address of the digest :meth:`launch_finalize` writes (32 bytes)."""
        return self._digest_out

    def launch_finalize(self) -> None:
        """Queue every remaining leaf and unit, then ``nhf_top_chunks`` and (for more than one
        1 KiB chunk of unit digests) ``nhf_finalize``: the digest on the device, at
        :attr:`digest_out`. The chunk-value scratch is their work area (at least 64 bytes per
        1 KiB chunk of the unit digests: 192 bytes per unit are there)."""
        if self._cvs + _finalize_work_bytes(self.units) > self._unit_out:  # pragma: no cover
            # Cannot happen (tests/backends/cuda/test_nh_fast_launcher_nogpu.py has the proof);
            # checked because the kernel would otherwise overwrite the unit digests it reads.
            raise IntegrityViolation("nh-fast-v1 finalize work area too small")
        if self._units_done < self.units:
            self.launch_ready(self.n)
        args: list[Arg] = [
            (U64, self._unit_out),
            (U64, self.units),
            (U64, self.n),
            (U64, self._top_key_dev),
            (U64, self._cvs),
            (U64, self._digest_out),
        ]
        chunks = _top_chunks(self.units)
        fn = self.mod.function("nhf_top_chunks")
        grid = -(-chunks // _TOP_THREADS)
        launch(fn, grid, _TOP_THREADS, self.stream, args, what="nhf_top_chunks")
        if chunks > 1:  # one chunk is the digest itself (written by nhf_top_chunks)
            tree: list[Arg] = [
                (U64, self.units),
                (U64, self._top_key_dev),
                (U64, self._cvs),
                (U64, self._digest_out),
            ]
            fn = self.mod.function("nhf_finalize")
            launch(fn, 1, _FIN_THREADS, self.stream, tree, what="nhf_finalize")

    def launch_leaves(self, first: int, end: int) -> None:
        """Queue the leaf tags of leaves ``[first, end)`` (fused: and the digest of every unit whose
        last uncounted leaf is among them; the counts add up across launches)."""
        if end <= first:
            return
        grid = min(self._grid_cap, -(-(end - first) // self._per_block))
        args: list[Arg] = [
            (U64, self.ptr),
            (U64, self.n),
            (U64, self._key_dev),
            (U64, first),
            (U64, end),
            (U64, self._tags),
        ]
        name = "nhf_leaf_tags"
        if self.fused:
            name = FUSED_KERNEL
            args += [(U64, self._unit_key_dev), (U64, self._counters), (U64, self._unit_out)]
        launch(self.mod.function(name), grid, _THREADS, self.stream, args, what=name)

    def launch_units(self, first: int, end: int) -> None:
        """Queue unit digests ``[first, end)``; their leaves must have been queued before. Fused,
        the leaf launches have queued them already: only the count of units done moves."""
        if end <= first:
            return
        if self.fused:
            self._units_done = max(self._units_done, end)
            return
        args: list[Arg] = [
            (U64, self._tags),
            (U64, self.leaves),
            (U64, self._unit_key_dev),
            (U64, first),
            (U64, end),
            (U64, self._unit_out),
        ]
        per_block = self._units_per_block
        fn = self.mod.function(UNFUSED_KERNEL)
        grid = -(-(end - first) // per_block)
        launch(fn, grid, per_block * _CHUNKS_PER_UNIT, self.stream, args, what=UNFUSED_KERNEL)
        self._units_done = max(self._units_done, end)

    def launch_ready(self, done_bytes: int) -> None:
        """Seal path: the first ``done_bytes`` bytes have landed; queue every leaf and unit that
        lies entirely inside them (all of them once ``done_bytes >= n``)."""
        if done_bytes >= self.n:
            leaves_ready, units_ready = self.leaves, self.units
        else:
            units_ready = done_bytes // UNIT_SIZE
            leaves_ready = units_ready * (UNIT_SIZE // LEAF_SIZE)
        first_unit = self._units_done
        if units_ready > first_unit:
            self.launch_leaves(first_unit * (UNIT_SIZE // LEAF_SIZE), leaves_ready)
            self.launch_units(first_unit, units_ready)

    def queue_copy_back(self, host: PinnedHostBuffer) -> None:
        """Queue the remaining unit kernels and the copy of all unit digests into ``host``."""
        if self._units_done < self.units:
            self.launch_ready(self.n)
        if host.size < 32 * self.units:
            raise InvalidInput("result buffer too small for the unit digests")
        check(
            driver().cuMemcpyDtoHAsync(host.address, self._unit_out, 32 * self.units, self.stream.handle),
            "cuMemcpyDtoHAsync",
        )

    def result(self, host: PinnedHostBuffer) -> HashResult:
        """After the stream has synchronized: the digest and unit digests."""
        units = bytes(host.view[: 32 * self.units])
        return HashResult(nhfast.finalize(self._sched, units, self.n), units)

    def finish(self, host: PinnedHostBuffer) -> HashResult:
        """Queue what remains, wait for the stream, and return the result."""
        self.queue_copy_back(host)
        with core_errors("nh-fast-v1 kernels"):
            self.stream.sync()
        return self.result(host)


def module_for(session: Session) -> Module:
    """The backend's loaded nh_fast module (compiled once, kept with its other modules)."""
    return session.module(SOURCE)


def leaf_blocks(session: Session, mod: Module, kernel: str = "nhf_leaf_tags") -> int:
    """The leaf kernel's grid: multiprocessors x resident blocks per multiprocessor (of
    ``kernel``: ``nhf_leaf_tags`` or the fused ``nhf_leaf_tags_units``)."""
    return int(session.multiprocessors) * session.blocks_per_sm(mod, kernel, _THREADS)


def launch_shape(session: Session) -> tuple[int, int]:
    """From the backend's defines for the kernel source: leaves per warp per round (NHF_INFLIGHT,
    for sizing small grids; NHF_PIPELINE=1 hashes one at a time) and units per ``nhf_units``
    block (NHF_UNITS_PER_BLOCK; 4 with NHF_UNITS_SMEM, the default, else 8)."""
    defines = session.kernel_defines(SOURCE)
    pipelined = defines.get("NHF_PIPELINE", "0") not in ("0", "")
    inflight = 1 if pipelined else int(defines.get("NHF_INFLIGHT", "2"))
    smem = defines.get("NHF_UNITS_SMEM", "1") not in ("0", "")
    return inflight, int(defines.get("NHF_UNITS_PER_BLOCK", "4" if smem else "8"))


def new_job(
    session: Session,
    ptr: int,
    n: int,
    key: bytes,
    *,
    scratch: int | None = None,
    stage: tuple[int, memoryview] | None = None,
    fused: bool | None = None,
    schedule: nhfast.KeySchedule | None = None,
    stream: Any = None,
) -> NhFastJob:
    """An :class:`NhFastJob` on the session's stream and module, sized for its device, in the
    session's scratch (or at device address ``scratch``, with :func:`scratch_bytes` (n) bytes);
    ``stage`` and ``schedule``: see :class:`NhFastJob`; ``fused``: see :data:`FUSED_UNITS` (its
    value when None)."""
    mod = module_for(session)
    if scratch is None:
        scratch = session.scratch(scratch_bytes(n))
    fused = FUSED_UNITS if fused is None else fused
    blocks = leaf_blocks(session, mod, FUSED_KERNEL if fused else "nhf_leaf_tags")
    inflight, units_per_block = launch_shape(session)
    return NhFastJob(
        mod,
        session.stream if stream is None else stream,
        ptr,
        n,
        key,
        scratch,
        leaf_blocks=blocks,
        inflight=inflight,
        stage=stage,
        fused=fused,
        schedule=schedule,
        units_per_block=units_per_block,
    )


def _run_rows(
    backend: Backend,
    rows: Sequence[tuple[int, int, bytes]],
    *,
    want_units: bool,
    while_running: Callable[[], None] | None = None,
    priority: str = "normal",
) -> tuple[list[bytes], list[HashResult]]:
    """nh-fast-v1 of every ``(ptr, n, key)`` row (memory the caller has checked and holds locked):
    one job per row on the backend's compute stream (``priority="low"``: the low lane's stream,
    buffers and lock, on a share of the SMs; see ``CudaBackend.kernel_session``), each in its own
    slice of the scratch buffer and of the pinned buffer (its key upload), every result copy
    queued behind its kernels, and ONE synchronization for the table. ``want_units``: the unit
    digests come back and the digest is finished on the host; otherwise ``nhf_finalize``
    finishes it on the device and 32 bytes per row come back (and the list of results is
    empty). A table that comes again on the lane with the same addresses runs as one CUDA graph
    launch (:data:`GRAPHS`, ``_graphs.GraphCache``).

    ``while_running`` (``Backend.digest_many``): called once every job and result copy is
    queued, before the synchronization; if it raises, the stream is synchronized (as on any
    error here) before its exception propagates."""
    # The key schedules (a 5 KiB BLAKE3 XOF each, ~2 us) are derived before the backend's lock is
    # taken and before any device work is queued, so that they never delay the GPU.
    scheds: list[nhfast.KeySchedule] = []
    for ptr, _n, key in rows:
        scheds.append(nhfast.key_schedule(nhfast.check_key(key)))
        if ptr % 16:
            raise InvalidInput("nh-fast-v1 needs 16-byte aligned device memory (16-byte loads)")
    if not rows:
        if while_running is not None:
            while_running()  # nothing to queue, nothing to wait for
        return [], []
    sizes = [_align(scratch_bytes(n)) for _p, n, _k in rows]
    # Rows the device finishes (the verify path of large shards); the rest come back as unit
    # digests and are finished on the host.
    on_device = [not want_units and unit_count(n) >= DEVICE_FINISH_UNITS for _p, n, _k in rows]
    down = [32 if dev else 32 * unit_count(n) for (_p, n, _k), dev in zip(rows, on_device, strict=True)]
    stage_at, host_bytes = _host_layout(down, len(rows))
    with backend.kernel_session(priority, preload=(SOURCE,)) as ks:
        base = ks.scratch(sum(sizes))
        backend.last_scratch_bytes = sum(sizes)
        backend.last_units_kernel = FUSED_KERNEL if FUSED_UNITS else UNFUSED_KERNEL
        host = ks.result_buffer(host_bytes)
        view = host.view
        staged = KEY_STAGE_BYTES * len(rows)
        try:
            _queue_and_wait(ks, rows, scheds, sizes, on_device, down, base, host, stage_at, while_running)
        except BaseException:
            # Copies into the pinned buffer may still be queued: let them land before the buffer
            # can be reused or freed (a broken context fails this too, and then copies nothing).
            with contextlib.suppress(Exception):
                ks.stream.sync()
            raise
        finally:
            # The staged key schedules are key material; the device has read them by now.
            view[stage_at : stage_at + staged] = bytes(staged)
        backend.last_device_seconds = elapsed_seconds(ks.t0, ks.t1)
        digests: list[bytes] = []
        hashed: list[HashResult] = []
        hoff = 0
        for (_p, n, _k), sched, nbytes, dev in zip(rows, scheds, down, on_device, strict=True):
            got = bytes(view[hoff : hoff + nbytes])
            hoff += nbytes
            if dev:
                digests.append(got)
            else:
                digests.append(nhfast.finalize(sched, got, n))
                if want_units:
                    hashed.append(HashResult(digests[-1], got))
        return digests, hashed


def _stage(view: memoryview, at: int, sched: nhfast.KeySchedule) -> None:
    """Write a job's key upload (NH key, unit key, top key) into the pinned stage at ``at``."""
    blob = sched.nh_key + sched.unit_key + sched.top_key
    view[at : at + len(blob)] = blob


def _queue_and_wait(
    ks: Session,
    rows: Sequence[tuple[int, int, bytes]],
    scheds: Sequence[nhfast.KeySchedule],
    sizes: Sequence[int],
    on_device: Sequence[bool],
    down: Sequence[int],
    base: int,
    host: PinnedHostBuffer,
    stage_at: int,
    while_running: Callable[[], None] | None = None,
) -> None:
    """``_run_rows``' device part: one job per row and the result copies (directly, or as the
    launch of the lane's graph of this very table), ``while_running`` (the caller's host work,
    with everything queued; ``_run_rows`` waits for the stream if it raises), and the one
    synchronization."""
    drv, view = driver(), host.view

    def enqueue(stream: Any) -> None:
        # Everything on `stream` (the session's, or a capturing one): nothing here waits or
        # reads a result, so the same calls can be recorded into a graph.
        jobs = []
        off = 0
        for i, ((ptr, n, key), size) in enumerate(zip(rows, sizes, strict=True)):
            at = stage_at + KEY_STAGE_BYTES * i
            stage = (host.address + at, view[at : at + KEY_STAGE_BYTES])
            job = new_job(ks, ptr, n, key, scratch=base + off, stage=stage, schedule=scheds[i], stream=stream)
            if on_device[i]:
                job.launch_finalize()
            else:
                job.launch_ready(n)
            jobs.append(job)
            off += size
        hoff = 0
        for job, nbytes, dev in zip(jobs, down, on_device, strict=True):
            src = job.digest_out if dev else job.unit_out
            check(drv.cuMemcpyDtoHAsync(host.address + hoff, src, nbytes, stream.handle), "cuMemcpyDtoHAsync")
            hoff += nbytes

    record(ks.stream, ks.t0)
    graphs = ks.graphs if GRAPHS else None
    if graphs is None:
        enqueue(ks.stream)
    else:
        # A graph reads the pinned stages when it runs: this call's key uploads go there first
        # (a direct or capturing enqueue writes them itself, again: the same bytes).
        for i, sched in enumerate(scheds):
            _stage(view, stage_at + KEY_STAGE_BYTES * i, sched)
        key = (
            tuple((ptr, n) for ptr, n, _k in rows),
            tuple(on_device),
            base,
            host.address,
            stage_at,
            FUSED_UNITS,
        )
        graphs.run(key, ks.stream, enqueue)
    record(ks.stream, ks.t1)
    if while_running is not None:
        while_running()
    ks.wait()


def nh_fast_many(
    backend: Backend,
    rows: Sequence[tuple[int, int, bytes]],
    *,
    while_running: Callable[[], None] | None = None,
    priority: str = "normal",
) -> list[HashResult]:
    """nh-fast-v1 digest and unit digests of every ``(ptr, n, key)`` row (memory the caller has
    checked and holds locked), in one pass with one synchronization. Each result is
    bit-identical to :func:`nh_fast_hash` of its row. ``while_running``, ``priority``: see
    ``_run_rows``."""
    return _run_rows(backend, rows, want_units=True, while_running=while_running, priority=priority)[1]


def nh_fast_digests(
    backend: Backend,
    rows: Sequence[tuple[int, int, bytes]],
    *,
    while_running: Callable[[], None] | None = None,
    priority: str = "normal",
) -> list[bytes]:
    """The verify path: the digest alone of every row, finished on the device (``nhf_finalize``),
    32 bytes per row copied back; bit-identical to ``nh_fast_many``'s digests.
    ``while_running``: see ``_run_rows``."""
    return _run_rows(backend, rows, want_units=False, while_running=while_running, priority=priority)[0]


def nh_fast_hash(backend: Backend, ptr: int, n: int, key: bytes) -> HashResult:
    """nh-fast-v1 digest and unit digests of the ``n`` bytes at device address ``ptr`` (memory the
    caller has checked belongs to ``backend``'s device and holds at least ``n`` bytes).

    Runs on the backend's compute stream under its lock; ``backend.last_device_seconds`` gets
    the kernels' device time, as for the other digests."""
    result = _run_rows(backend, [(ptr, n, key)], want_units=True)[1][0]
    if len(result.unit_digests) != 32 * unit_count(n):  # pragma: no cover - defensive
        raise IntegrityViolation("nh-fast-v1 kernels returned a short result")
    return result


def nh_fast_digest(backend: Backend, ptr: int, n: int, key: bytes) -> bytes:
    """The digest alone of the ``n`` bytes at ``ptr`` (the verify path; see ``nh_fast_digests``)."""
    return _run_rows(backend, [(ptr, n, key)], want_units=False)[0][0]


def key_trials(
    backend: Backend,
    a: bytes,
    keys: bytes,
    *,
    b: bytes | None = None,
    flips: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Test entry (``nhf_key_trials``): leaf tags of ``a`` and of its changed form (``b``, or ``a``
    with one bit flipped per trial, ``flips`` as little-endian u32 bit indices) under each NH key
    in ``keys`` (5120 bytes each). Returns (tags of a, tags of the change), trial-major."""
    if len(a) % LEAF_SIZE or not a or len(keys) % nhfast.NH_KEY_BYTES or not keys:
        raise InvalidInput("whole leaves and whole NH keys are needed")
    if (b is None) == (flips is None) or (b is not None and len(b) != len(a)):
        raise InvalidInput("give either b (same length as a) or flips")
    count = len(keys) // nhfast.NH_KEY_BYTES
    if flips is not None and len(flips) != 4 * count:
        raise InvalidInput("one flip per key")
    leaves = len(a) // LEAF_SIZE
    out_size = 8 * nhfast.INSTANCES * leaves * count
    blobs = [a, keys, b or b"\x00", flips or b"\x00"]
    sizes = [_align(len(x)) for x in blobs] + [_align(out_size), _align(out_size)]
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    with backend.kernel_session() as ks, ks.temporary(sum(sizes)) as base:
        # One allocation of its own, freed after (the keys run to hundreds of MB: they must not
        # grow the backend's scratch, which it keeps). Inputs go up in stream order, so the
        # kernel, queued behind them on the same stream, reads them whole.
        drv, stream = driver(), ks.stream
        ptrs = [base + o for o in offs]
        for p, data in zip(ptrs, blobs, strict=False):
            addr, keep = host_address(memoryview(data))
            # From pageable memory the call returns once the bytes are staged.
            check(drv.cuMemcpyHtoDAsync(p, addr, len(data), stream.handle), "cuMemcpyHtoDAsync")
            del keep
        args: list[Arg] = [
            (U64, ptrs[0]),
            (U64, ptrs[2] if b is not None else 0),
            (U64, ptrs[3] if flips is not None else 0),
            (U32, leaves),
            (U64, ptrs[1]),
            (U32, count),
            (U64, ptrs[4]),
            (U64, ptrs[5]),
        ]
        fn = module_for(ks).function("nhf_key_trials")
        launch(fn, -(-count // 4), 128, stream, args, what="nhf_key_trials")
        with core_errors("nhf_key_trials"):
            stream.sync()
        return ks.copy_out(ptrs[4], out_size), ks.copy_out(ptrs[5], out_size)
