"""NVIDIA's ``cuda.core`` as the CUDA backend uses it: devices (primary contexts), streams, events,
kernel launches, pinned host memory, and the one memory resource of our own.

What comes from cuda.core: ``Device`` (``set_current`` makes the device's *primary* context
current, as ``cuDevicePrimaryCtxRetain`` + ``cuCtxSetCurrent`` did before), ``Stream`` and
``StreamOptions`` (priorities), ``Event`` and ``EventOptions`` (timing, ``is_done`` polling),
``ObjectCode``/``Kernel`` (loading CUBIN, occupancy), ``launch``/``LaunchConfig``, and
``LegacyPinnedMemoryResource`` (``cuMemAllocHost``, page-locked host memory).

What stays on cuda-bindings, each said again where it is called:

- exact device allocations (``ExactDeviceMemoryResource``, :func:`exact_resource_class`):
  cuda.core's device resource is a stream-ordered pool (``cuMemAllocAsync``), which keeps freed
  memory for reuse and rounds sizes; a sealed shard must own exactly its own ``cuMemAlloc``
  allocation, whose bytes are zeroed before the driver gets them back. cuda.core has no public
  non-pool device resource, so this resource calls ``cuMemAlloc``, ``cuMemsetD8Async`` and
  ``cuMemFree`` itself;
- pointer attributes (the VRAM-only policy), range copies at offsets, peer access, ``__constant__``
  symbols and memory info: cuda.core 1.2 has no API for them (see ``_backend``).

cuda.core raises its own ``CUDAError`` whose message starts with the driver's error name;
:func:`core_errors` maps it to our error classes exactly like :func:`._driver.map_error` maps a
driver result, so callers see the same errors as before the port.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from vram_residency.backends.cuda import _driver
from vram_residency.backends.cuda._driver import check, driver, map_name, request_error
from vram_residency.errors import CudaAllocationFailed, IntegrityViolation, VramError


class CuMemAllocFailed(CudaAllocationFailed):
    """``cuMemAlloc`` itself failed; ``name`` is the driver's error name, so that each caller
    keeps its own mapping (InsufficientVram for out of memory, and so on)."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__(f"cuMemAlloc of {size} bytes failed: {name}")
        self.name = name


__all__ = [
    "OUT_OF_MEMORY",
    "CuMemAllocFailed",
    "capture_gate",
    "core",
    "core_errors",
    "device",
    "elapsed_seconds",
    "event_sync",
    "exact_resource",
    "exact_resource_class",
    "map_core_error",
    "pinned_resource",
    "record",
    "stream_wait",
]

log = logging.getLogger("vram_residency.cuda")

_core: Any = None
_NAME = re.compile(r"\b(CUDA_ERROR_[A-Z0-9_]+)\b")


def core() -> Any:
    """The ``cuda.core`` package (imported once); ConfigError when the ``cuda`` extra is missing."""
    global _core
    if _core is None:
        driver()  # cuda.core needs cuda-bindings: say so first, with the same message as before
        try:
            import cuda.core as cc
        except ImportError as exc:
            raise request_error(
                "the cuda-core package is not installed (pip install 'vram-residency[cuda]')"
            ) from exc
        _core = cc
    return _core


def _cuda_error_type() -> type[BaseException]:
    # cuda.core's CUDAError lives in a private module in 1.2 (it is not re-exported).
    from cuda.core._utils.cuda_utils import CUDAError

    err: type[BaseException] = CUDAError
    return err


def map_core_error(exc: BaseException, what: str) -> VramError:
    """Our error for a cuda.core ``CUDAError`` (its message starts with the driver error name)."""
    m = _NAME.search(str(exc))
    return map_name(m.group(1) if m else type(exc).__name__, what)


class core_errors:  # noqa: N801 - used like the function-style context managers around it
    """Run cuda.core calls with their CUDA errors mapped to ours (ConfigError, InvalidInput,
    CudaAllocationFailed, IntegrityViolation), naming ``what`` failed.

    A class rather than ``contextlib.contextmanager``: it wraps every launch, record and sync of
    the verify path (six or more per call), and a generator-based manager cost ~1.5 us each on
    the H200's host (cProfile, 1 MiB digests), a few percent of a small shard's verify."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, VramError) or not isinstance(exc, Exception):
            return
        if isinstance(exc, _cuda_error_type()):
            raise map_core_error(exc, self._what) from exc


# -- stream and event helpers: cuda.core calls with the error names the driver calls had ----------
# (shared by the backend's own digests and by the launchers of other modules, e.g. _nh_fast)


def record(stream: Any, event: Any) -> None:
    """Record cuda.core ``Event`` ``event`` on cuda.core ``Stream`` ``stream``."""
    with core_errors("cuEventRecord"):
        stream.record(event)


def stream_wait(stream: Any, event: Any) -> None:
    """Make ``stream`` wait (on the device) for what was queued before ``event`` was recorded."""
    with core_errors("cuStreamWaitEvent"):
        stream.wait(event)


def event_sync(event: Any, what: str) -> None:
    with core_errors(what):
        event.sync()


def elapsed_seconds(t0: Any, t1: Any) -> float:
    """Seconds between two recorded timing events (cuda.core: ``Event - Event`` is milliseconds)."""
    with core_errors("cuEventElapsedTime"):
        return float(t1 - t0) / 1e3


class _PrimaryContextWarmup(threading.Thread):
    """Creates device ``ordinal``'s primary context on a helper thread (cuDevicePrimaryCtxRetain,
    which holds no GIL while the driver works) while the caller imports cuda.core (which needs
    the GIL: Python modules and shared libraries). On an H200 host the two took ~150 ms and
    ~200-300 ms one after the other, which was most of a new process's first seal. The helper's
    retain is dropped (:meth:`release`) once cuda.core's ``Device.set_current`` holds its own, so
    the context's lifetime is cuda.core's, exactly as without the helper. Any failure here is
    ignored: ``set_current`` then meets it again and reports it as before."""

    def __init__(self, ordinal: int) -> None:
        super().__init__(name="vram-residency-context", daemon=True)
        self._ordinal = ordinal
        self._held: Any = None

    def run(self) -> None:
        try:
            drv = driver()
            err, cudev = drv.cuDeviceGet(self._ordinal)
            if err != drv.CUresult.CUDA_SUCCESS:
                return
            err, _ctx = drv.cuDevicePrimaryCtxRetain(cudev)
            if err == drv.CUresult.CUDA_SUCCESS:
                self._held = cudev
        except Exception:  # a warm-up only: set_current meets and reports real errors
            return

    def release(self) -> None:
        self.join()
        held, self._held = self._held, None
        if held is not None:
            driver().cuDevicePrimaryCtxRelease(held)


def device(ordinal: int) -> Any:
    """cuda.core's ``Device`` for ``ordinal`` (after our own cuInit, which says why a GPU is
    unusable as a ConfigError), current on the calling thread (``set_current``: its primary
    context, retained by cuda.core for the process)."""
    _driver.init()
    warmup = _PrimaryContextWarmup(ordinal) if _core is None else None
    if warmup is not None:
        warmup.start()
    try:
        with core_errors("opening the CUDA device"):
            dev = core().Device(ordinal)
            if warmup is not None:
                warmup.join()
            dev.set_current()
    finally:
        if warmup is not None:
            warmup.release()
    return dev


_gates: dict[int, threading.RLock] = {}
_gates_lock = threading.Lock()


def capture_gate(device_id: int) -> threading.RLock:
    """The lock that keeps this process's own ``cuMemAlloc`` and ``cuMemFree`` on a device out of
    its CUDA graph captures there (``_graphs.GraphCache`` holds it from the start of a capture to
    the instantiated graph; the exact memory resource around each allocation and free).

    Why: graphs are captured in "relaxed" mode, so that another thread's allocation is not refused
    during a capture (the "global" mode's CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED), but an allocation
    or a free (calls that may synchronize the device) beside a capture is what CUDA calls
    potentially unsafe. Measured on an H200 (driver 580.159, 2026-11-30) with another thread
    allocating, zeroing and freeing 64 KiB without a pause (the diagnostic of
    ``tests/gpu/test_graph_capture_races.py``, bench/results/logs/graph-capture-race-2026-11-30d.log),
    freshly captured graphs whose first launch failed with CUDA_ERROR_UNKNOWN: 93 of 37,200
    without the gate, 16 of 78,120 with it, 0 of 39,360 with no other thread at work. Gating the
    launches too, or uploading each graph inside the gate, left the rest (45 of 80,760; 4 of
    24,480). What remains may go with the other thread's zeroing on the compute stream, which the
    gate does not cover (a verify would then wait for a seal's zeroing); that was not measured
    alone. A launch that failed queued nothing, and ``GraphCache.run`` queues its work directly
    instead. A capture takes tens to hundreds of microseconds and happens once per key, so an
    allocation seldom waits. Reentrant: work enqueued during a capture on the
    capturing thread is not blocked by its own gate."""
    with _gates_lock:
        gate = _gates.get(device_id)
        if gate is None:
            gate = _gates[device_id] = threading.RLock()
        return gate


_pinned_lock = threading.Lock()
_pinned: Any = None


def pinned_resource() -> Any:
    """cuda.core's ``LegacyPinnedMemoryResource``: ``cuMemAllocHost`` (page-locked, portable to
    every context, the same memory ``cuMemHostAlloc(size, 0)`` gave before). Not the pooled
    ``PinnedMemoryResource``: staging buffers are few, long-lived and sized by us, and a pool would
    keep released model bytes in pages we no longer track."""
    global _pinned
    with _pinned_lock:
        if _pinned is None:
            _pinned = core().LegacyPinnedMemoryResource()
        return _pinned


def _memory_resource_base() -> type:
    base: type = core().MemoryResource
    return base


_exact_cls: type | None = None
_exact_lock = threading.Lock()


def exact_resource_class() -> type:
    """The ``ExactDeviceMemoryResource`` class (built on first use, because cuda.core is imported
    lazily): a cuda.core ``MemoryResource`` whose every
    allocation is one exact ``cuMemAlloc`` (optionally zero-filled), and whose deallocation zeroes
    the bytes (``cuMemsetD8Async`` on the backend's stream, then a synchronization) before
    ``cuMemFree``.

    Why cuda-bindings here: cuda.core's default device resource is a pool (``cuMemAllocAsync``)
    that rounds sizes and keeps freed blocks; it cannot give an allocation of exactly the
    requested capacity whose range the pointer-attribute policy can check, nor guarantee that the
    bytes are zeroed before the memory changes hands.

    Errors: cuda.core calls ``deallocate`` from a ``Buffer``'s destructor, where it turns
    exceptions into warnings. So ``deallocate`` never raises: it records the failure, and
    :meth:`free` (what the backend calls) raises it, as the backend's own free did before.
    """
    global _exact_cls
    with _exact_lock:
        if _exact_cls is not None:
            return _exact_cls
        base = _memory_resource_base()

        class _Exact(base):  # type: ignore[misc, valid-type]
            def __init__(self, dev: Any, stream: Any, *, zero: bool) -> None:
                super().__init__()
                self._dev = dev
                self._zero_stream = stream
                self._zero = zero
                self._failures: dict[int, VramError] = {}
                self._lock = threading.Lock()
                self._gate = capture_gate(int(dev.device_id))

            # -- cuda.core's MemoryResource interface -------------------------------------------

            def allocate(self, size: int, stream: Any = None) -> Any:
                """An exact ``cuMemAlloc`` of ``size`` bytes as a cuda.core ``Buffer`` (zeroed when
                the resource zeroes). Raises CuMemAllocFailed (a CudaAllocationFailed) with the
                driver's error name when cuMemAlloc fails; callers map it (InsufficientVram for
                out of memory)."""
                drv = driver()
                self._dev.set_current()
                with self._gate:
                    err, dptr = drv.cuMemAlloc(size)
                if err != drv.CUresult.CUDA_SUCCESS:
                    raise CuMemAllocFailed(size, _driver.error_name(err))
                ptr = int(dptr)
                if self._zero:
                    try:
                        # Zero-filled, so that a read before any write never shows earlier
                        # contents.
                        check(drv.cuMemsetD8Async(ptr, 0, size, self._zero_stream.handle), "cuMemsetD8Async")
                        with core_errors("zeroing a new allocation"):
                            self._zero_stream.sync()
                    except BaseException:
                        with self._gate:
                            drv.cuMemFree(ptr)
                        raise
                try:
                    with core_errors("wrapping a device allocation"):
                        return core().Buffer.from_handle(ptr, size, mr=self)
                except BaseException:
                    with self._gate:
                        drv.cuMemFree(ptr)
                    raise

            def deallocate(self, ptr: Any, size: int, stream: Any = None) -> None:
                """Zero (when the resource zeroes), synchronize, then ``cuMemFree``. Never raises
                (cuda.core calls it from destructors); a failure is kept for :meth:`free`."""
                p = int(ptr)
                failure: VramError | None = None
                drv = driver()
                try:
                    self._dev.set_current()
                    if self._zero and size:
                        zs = self._zero_stream.handle
                        check(drv.cuMemsetD8Async(p, 0, size, zs), "zeroing before free")
                        with core_errors("zeroing before free"):
                            self._zero_stream.sync()
                except Exception as exc:
                    failure = (
                        exc
                        if isinstance(exc, VramError)
                        else IntegrityViolation(f"zeroing before free failed: {type(exc).__name__}")
                    )
                finally:
                    with self._gate:
                        (err,) = drv.cuMemFree(p)
                    if err != drv.CUresult.CUDA_SUCCESS and failure is None:
                        failure = _driver.map_error(err, "cuMemFree")
                if failure is not None:
                    with self._lock:
                        self._failures[p] = failure
                    log.warning("freeing device memory: %s", failure)

            @property
            def is_device_accessible(self) -> bool:
                return True

            @property
            def is_host_accessible(self) -> bool:
                return False

            @property
            def device_id(self) -> int:
                return int(self._dev.device_id)

            # -- ours ---------------------------------------------------------------------------

            def free(self, mem: Any) -> None:
                """Close ``mem`` (a Buffer from :meth:`allocate`): zero, synchronize, free; raise
                what went wrong (IntegrityViolation when the bytes may not have been zeroed)."""
                p = int(mem.handle)
                try:
                    with core_errors("freeing device memory"):
                        mem.close()
                finally:
                    with self._lock:
                        failure = self._failures.pop(p, None)
                if failure is not None:
                    raise failure

        _Exact.__name__ = _Exact.__qualname__ = "ExactDeviceMemoryResource"
        _exact_cls = _Exact
        return _Exact


def exact_resource(dev: Any, stream: Any, *, zero: bool) -> Any:
    """An :func:`exact_resource_class` instance on ``dev``, zeroing on ``stream`` when ``zero``."""
    return exact_resource_class()(dev, stream, zero=zero)


OUT_OF_MEMORY = "CUDA_ERROR_OUT_OF_MEMORY"
