"""Lifetimes of the CUDA backend's grown buffers and of its lanes at close, without a GPU.

- A grown result buffer, low-lane arena or low-lane pinned buffer is freed only after the
  stream whose work uses it is drained: ``cuMemFreeHost`` does not wait for our non-blocking
  streams, and the arena's zeroing before ``cuMemFree`` runs on the compute stream, which the
  low lane's stream is not ordered with. A call that failed or was interrupted between queuing
  and synchronizing would otherwise leave copies landing in freed memory.
- A buffer whose close fails is not kept (its size would satisfy later calls with a closed
  buffer).
- ``close()`` refuses a low-lane user that was waiting for the lane's lock while the lane was
  closed (the low lane's users hold its lock, not the backend's).

The backend and its lanes are made without their constructors; streams, pinned buffers and the
memory resource are stand-ins that record what was asked of them, in order; nothing is launched.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from vram_residency.backends.cuda import _backend
from vram_residency.backends.cuda._backend import CudaBackend, _Lane
from vram_residency.backends.cuda._graphs import GraphCache
from vram_residency.errors import ConfigError, IntegrityViolation


class _Stream:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self.handle = name

    def sync(self) -> None:
        self.log.append(f"sync {self.name}")

    def close(self) -> None:
        self.log.append(f"close {self.name}")


class _Pinned:
    """Stands in for ``PinnedHostBuffer`` (same constructor arguments)."""

    log: ClassVar[list[str]] = []
    fail_close: ClassVar[bool] = False

    def __init__(self, size: int, dev: Any = None) -> None:
        self.size = size
        self.closed = False
        self.log.append(f"pin {size}")

    def close(self) -> None:
        self.log.append(f"unpin {self.size}")
        self.closed = True
        if self.fail_close:
            raise IntegrityViolation("freeing pinned host memory failed")


class _Graphs(GraphCache):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def invalidate(self) -> None:
        self.log.append("invalidate graphs")
        super().invalidate()


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(_Pinned, "log", calls)
    monkeypatch.setattr(_Pinned, "fail_close", False)
    monkeypatch.setattr(_backend, "PinnedHostBuffer", _Pinned)
    return calls


def _backend_with_results(log: list[str], size: int) -> Any:
    b: Any = CudaBackend.__new__(CudaBackend)
    b._stream = _Stream(log, "compute")
    b._graphs = _Graphs(log)
    b._dev = None
    b._results = _Pinned(size)
    log.clear()
    return b


def test_a_grown_result_buffer_is_freed_after_the_compute_stream_is_drained(log: list[str]) -> None:
    b = _backend_with_results(log, 64 << 10)
    assert b._result_buffer(32).size == 64 << 10
    assert log == []  # big enough: nothing happens
    grown = b._result_buffer((64 << 10) + 1)
    assert grown.size == 128 << 10
    assert log == ["invalidate graphs", "sync compute", f"unpin {64 << 10}", f"pin {128 << 10}"]


def test_a_result_buffer_whose_close_fails_is_not_kept(
    log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = _backend_with_results(log, 64 << 10)
    monkeypatch.setattr(_Pinned, "fail_close", True)
    with pytest.raises(IntegrityViolation):
        b._result_buffer(1 << 20)
    # Not the closed buffer: its size would satisfy the next small call.
    assert b._results is None
    monkeypatch.setattr(_Pinned, "fail_close", False)
    assert not b._result_buffer(32).closed


class _Resource:
    """Stands in for the backend's exact memory resource (``_core.exact_resource``)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.next = 0x7000_0000

    def allocate(self, size: int) -> Any:
        self.log.append(f"allocate {size}")
        # The same address each time: cuMemAlloc does give a grown buffer the freed one's.
        return SimpleNamespace(handle=self.next, size=size)

    def free(self, mem: Any) -> None:
        self.log.append(f"free {mem.size} (zeroed on the compute stream)")


def _low_lane(log: list[str]) -> Any:
    lane: Any = _Lane.__new__(_Lane)
    lane.b = SimpleNamespace(_scratch_mr=_Resource(log), _dev=None)
    lane.low = True
    lane.stream = _Stream(log, "low")
    lane.graphs = _Graphs(log)
    lane.arena_mem = None
    lane.arena_ptr = lane.arena_size = 0
    lane.host = None
    return lane


def test_a_grown_low_lane_arena_is_freed_after_the_lanes_stream_is_drained(log: list[str]) -> None:
    lane = _low_lane(log)
    assert lane.arena(100) == 0x7000_0000
    assert log == [f"allocate {1 << 16}"]
    log.clear()
    assert lane.arena((1 << 16) + 1) == 0x7000_0000
    assert log == [
        "invalidate graphs",
        "sync low",  # the free's zeroing runs on the compute stream: not ordered with this one
        f"free {1 << 16} (zeroed on the compute stream)",
        f"allocate {(1 << 16) + 4096}",
    ]


def test_a_grown_low_lane_pinned_buffer_is_freed_after_the_lanes_stream_is_drained(log: list[str]) -> None:
    lane = _low_lane(log)
    lane._pinned(10)
    log.clear()
    lane._pinned(1 << 20)
    assert log == ["invalidate graphs", "sync low", f"unpin {64 << 10}", f"pin {1 << 20}"]


def test_a_low_lane_pinned_buffer_whose_close_fails_is_not_kept(
    log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = _low_lane(log)
    lane._pinned(10)
    monkeypatch.setattr(_Pinned, "fail_close", True)
    with pytest.raises(IntegrityViolation):
        lane._pinned(1 << 20)
    assert lane.host is None


def _closable_backend(log: list[str]) -> tuple[Any, Any]:
    """A backend with a low lane, whose close() runs for real over stand-ins."""
    b: Any = CudaBackend.__new__(CudaBackend)
    b._closed = False
    b._closing = False
    b._dev = SimpleNamespace(set_current=lambda: log.append("set current"))
    b._live_lock = threading.Lock()
    b._live = set()
    b._lock = threading.RLock()
    b._staging_lock = threading.Lock()
    b._stream = _Stream(log, "compute")
    b._copy_stream = _Stream(log, "copy")
    b._capture_stream = _Stream(log, "capture")
    b._graphs = GraphCache()
    b._prepared_lock = threading.Lock()
    b._prepared = {}
    b._table_fns = {}
    b._scratch_mem = None
    b._scratch_mr = _Resource(log)
    b._results = None
    b._staging = []
    b._host_pool = SimpleNamespace(clear=lambda: None)
    b._copy_pool = None
    b._modules = {}
    b._sides = []
    b._xfer_event = b._t0 = b._t1 = _Stream(log, "event")
    lane = _low_lane(log)
    lane.b = b
    lane.owns_stream = True
    lane.lock = threading.RLock()
    lane.done = lane.t0 = lane.t1 = _Stream(log, "lane event")
    b._lanes = {"low": lane}
    return b, lane


def test_a_low_lane_user_waiting_while_close_closes_the_lane_is_refused(log: list[str]) -> None:
    # _run_batch (and the low kernel_session) take the lane, then its lock, then _activate:
    # close() holds the backend's lock throughout but each lane's lock only while closing that
    # lane. A user that got the lane before close() and its lock after the lane was closed must
    # be refused, not allocate a new arena nobody frees and launch on the closed stream.
    b, lane = _closable_backend(log)
    assert b._lane("low") is lane
    seen: list[str] = []

    def low_user() -> None:
        with lane.lock:
            try:
                b._activate()
            except ConfigError as exc:
                seen.append(f"refused: {exc}")
                return
            lane.arena(1 << 20)
            seen.append("ran on the closed lane")

    def capture_stream_closed() -> None:
        # Runs inside close(), after the lanes were closed, with the backend's lock held: the
        # user that was waiting for the lane's lock gets it now.
        t = threading.Thread(target=low_user)
        t.start()
        t.join(10)
        assert not t.is_alive()

    b._capture_stream.close = capture_stream_closed
    b.close()
    assert seen == ["refused: the CUDA backend is closed"]
    assert lane.arena_mem is None and not any(e.startswith("allocate") for e in log)
    assert b._closed


class _Driver:
    """Stands in for cuda-bindings' driver: device-to-device copies that succeed until
    ``fail_at`` (then return an error, as a failed launch of a copy does)."""

    def __init__(self, log: list[str], fail_at: int) -> None:
        self.log, self.fail_at, self.calls = log, fail_at, 0

    def cuMemcpyDtoDAsync(self, dst: int, src: int, n: int, stream: object) -> tuple[str]:
        self.calls += 1
        if self.calls == self.fail_at:
            return ("CUDA_ERROR_LAUNCH_FAILED",)
        self.log.append(f"copy {n} at {dst - 0x1000:#x}")
        return ("ok",)


def _mover(log: list[str], monkeypatch: pytest.MonkeyPatch, fail_at: int) -> Any:
    drv = _Driver(log, fail_at)
    monkeypatch.setattr(_backend, "driver", lambda: drv)

    def check(result: tuple[str], what: str) -> None:
        if result[0] != "ok":
            raise IntegrityViolation(f"{what} failed: {result[0]}")

    monkeypatch.setattr(_backend, "check", check)
    db = SimpleNamespace(_activate=lambda: None, _copy_stream=_Stream(log, "copy"))
    db._sync = lambda stream, what: stream.sync()
    mover: Any = _backend._Mover.__new__(_backend._Mover)
    mover.db = mover.sb = db
    mover.dst = SimpleNamespace(_ptr=0x1000)
    mover.src = SimpleNamespace(_ptr=0x9000)
    mover.same, mover.peer, mover.stage, mover.pending = True, True, [], False
    return mover


def test_a_copy_that_fails_part_way_leaves_nothing_in_flight(
    log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # _peer_peer_copy_raw's pattern: chunks issued one by one, close() in a finally clause, then
    # both buffers' locks released (the caller may free them; neither free waits for this
    # backend's copy stream).
    mover = _mover(log, monkeypatch, fail_at=3)

    def copy_raw() -> None:
        try:
            for off in range(0, 4 << 20, 1 << 20):
                mover.issue(off, 1 << 20)
            mover.wait()
        finally:
            mover.close()

    with pytest.raises(IntegrityViolation):
        copy_raw()
    assert log == ["copy 1048576 at 0x0", "copy 1048576 at 0x100000", "sync copy"]


def test_a_copy_waited_for_is_not_waited_for_again(log: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    mover = _mover(log, monkeypatch, fail_at=0)
    mover.issue(0, 1 << 20)
    mover.wait()
    mover.close()
    assert log == ["copy 1048576 at 0x0", "sync copy"]


def test_close_closes_the_backends_graphs_before_the_normal_lanes_arena_is_freed(log: list[str]) -> None:
    # The normal lane's table graphs live in the backend's cache and name the lane's arena.
    b, low = _closable_backend(log)

    class _LoggedGraphs(GraphCache):
        def close(self) -> None:
            log.append("close backend graphs")
            super().close()

    b._graphs = _LoggedGraphs()
    normal = _low_lane(log)
    normal.b, normal.low, normal.owns_stream = b, False, False
    normal.lock = b._lock
    normal.graphs = b._graphs
    normal.done = normal.t0 = normal.t1 = _Stream(log, "normal lane event")
    normal.arena_mem = SimpleNamespace(handle=0x7000_0000, size=1 << 16)
    b._lanes = {"normal": normal, "low": low}
    b.close()
    assert log.index("close backend graphs") < log.index(f"free {1 << 16} (zeroed on the compute stream)")


def test_while_close_runs_new_work_is_refused_but_memory_can_still_be_released(log: list[str]) -> None:
    # A VMM range released while the backend closes (its zeroing and unmapping) makes the device
    # current through _make_current, which only a finished close refuses.
    b, _lane = _closable_backend(log)
    b._closing = True
    with pytest.raises(ConfigError):
        b._activate()
    b._make_current()
    assert log == ["set current"]
    b._closed = True
    with pytest.raises(ConfigError):
        b._make_current()
