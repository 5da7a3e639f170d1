"""Staged host-to-device copies without a GPU: ``parallel_copy``'s ``meanwhile`` and the order in
which ``CudaBackend._copy_in`` fills staging buffers, queues copies and runs ``on_chunk``.

With a pageable source the host copy into the staging buffers is a seal's critical path, so each
chunk's ``on_chunk`` (a seal's unit-kernel launch) runs while the host threads copy the next
chunk. What must hold: every byte is in the staging buffer before its copy is queued, an
``on_chunk(done)`` comes only after the copies of those ``done`` bytes are queued and before the
next copy is, the last one after the last copy, and an error leaves no host thread still copying
and the copy stream drained.

The backend is made without its constructor; the driver's copy, event and stream calls are
stand-ins that log what was asked of them (the copy reads the staging buffer as the DMA would);
the staging copy itself is the real ``parallel_copy`` on a real thread pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vram_residency.backends.cuda import _backend
from vram_residency.backends.cuda._backend import CudaBackend
from vram_residency.backends.cuda._staging import parallel_copy

MiB = 1 << 20


# -- parallel_copy ---------------------------------------------------------------------------------


def test_meanwhile_runs_while_the_pieces_are_copied() -> None:
    src = np.arange(8 * MiB, dtype=np.uint64).view(np.uint8)[: 8 * MiB]
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    release = threading.Event()
    seen: list[bool] = []

    with ThreadPoolExecutor(4) as pool:
        # A piece that waits for meanwhile: it can end only if meanwhile runs before the wait.
        blocker = pool.submit(release.wait, 10)

        def meanwhile() -> None:
            seen.append(not blocker.done())
            release.set()

        parallel_copy(pool, dst, src, 4, meanwhile)
    assert seen == [True]
    assert np.array_equal(dst, src)


def test_without_a_pool_the_copy_comes_first_then_meanwhile() -> None:
    src = np.full(3 * MiB, 7, dtype=np.uint8)
    dst = np.zeros(4 * MiB, dtype=np.uint8)
    copied: list[bool] = []
    parallel_copy(None, dst, src, 16, lambda: copied.append(bool((dst[: 3 * MiB] == 7).all())))
    assert copied == [True]
    assert not dst[3 * MiB :].any()


def test_an_error_in_meanwhile_is_raised_after_every_piece_has_ended() -> None:
    src = np.ones(8 * MiB, dtype=np.uint8)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    started = threading.Event()
    pieces: list[Any] = []

    class Pool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            def slow() -> Any:
                started.set()
                threading.Event().wait(0.05)
                return fn(*args, **kwargs)

            f = super().submit(slow)
            pieces.append(f)
            return f

    def meanwhile() -> None:
        started.wait(5)
        raise RuntimeError("launch failed")

    with Pool(4) as pool, pytest.raises(RuntimeError, match="launch failed"):
        parallel_copy(pool, dst, src, 4, meanwhile)
    assert len(pieces) == 4 and all(f.done() for f in pieces)
    assert (dst == 1).all()  # the pieces were not abandoned


def test_a_failed_piece_is_raised_after_the_others_have_ended() -> None:
    src = np.ones(8 * MiB, dtype=np.uint8)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    pieces: list[Any] = []

    class Pool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            index = len(pieces)

            def piece() -> Any:
                if index == 0:
                    raise MemoryError("piece 0")
                threading.Event().wait(0.02)
                return fn(*args, **kwargs)

            f = super().submit(piece)
            pieces.append(f)
            return f

    ran: list[int] = []
    with Pool(4) as pool, pytest.raises(MemoryError, match="piece 0"):
        parallel_copy(pool, dst, src, 4, lambda: ran.append(1))
    assert ran == [1]
    assert all(f.done() for f in pieces)
    assert (dst[2 * MiB :] == 1).all() and not dst[: 2 * MiB].any()


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("can't start new thread"), KeyboardInterrupt()],
    ids=["thread-start-failed", "interrupted"],
)
def test_a_piece_queued_by_a_failing_submit_never_copies_after_the_error(failure: BaseException) -> None:
    """``ThreadPoolExecutor.submit`` queues the piece, then starts a worker thread: a thread that
    cannot start (RuntimeError) or a KeyboardInterrupt while ``Thread.start`` waits for it makes
    submit raise with the piece queued and its future lost. The pool's other worker runs it
    later; it must not write the staging buffer after parallel_copy has raised (the next chunk's
    copy, or another write, fills that buffer then, and the caller may free the source)."""
    src = np.ones(8 * MiB, dtype=np.uint8)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    ran: list[int] = []

    class Pool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            index = len(ran)
            ran.append(index)

            def late() -> Any:
                if index == 1:
                    threading.Event().wait(0.1)  # still queued when parallel_copy raises
                return fn(*args, **kwargs)

            f = super().submit(late)
            if index == 1:
                raise failure  # as _adjust_thread_count's Thread.start would, after the put
            return f

    with Pool(4) as pool:
        with pytest.raises(type(failure)):
            parallel_copy(pool, dst, src, 4)
        after_error = dst.copy()
    # The pool has shut down (every queued piece has run): nothing was written after the error.
    assert ran == [0, 1]
    assert np.array_equal(dst, after_error)
    assert (dst[: 2 * MiB] == 1).all()  # the piece with a future ran and was waited for


def test_a_shut_down_pool_raises_and_copies_nothing() -> None:
    src = np.ones(8 * MiB, dtype=np.uint8)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    pool = ThreadPoolExecutor(4)
    pool.shutdown()
    called: list[int] = []
    with pytest.raises(RuntimeError, match="after shutdown"):
        parallel_copy(pool, dst, src, 4, lambda: called.append(1))
    assert not called and not dst.any()


# -- CudaBackend._copy_in ------------------------------------------------------------------------------


class _Stream:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.handle = "copy"

    def sync(self) -> None:
        self.log.append("sync copy")


def _backend_for_copies(log: list[str], staging_bytes: int, pool: ThreadPoolExecutor) -> Any:
    b: Any = CudaBackend.__new__(CudaBackend)
    b._closing = b._closed = False
    b._dev = SimpleNamespace(set_current=lambda: None)
    b._staging_bytes = staging_bytes
    b._staging = [
        (SimpleNamespace(array=np.zeros(staging_bytes, dtype=np.uint8), address=k), f"done{k}")
        for k in range(2)
    ]
    b._staging_lock = threading.Lock()
    b._copy_pool = pool
    b._copy_threads = 4
    b._copy_stream = _Stream(log)
    b._is_pinned = lambda addr, n: False
    return b


STEP = 4 * MiB


@settings(max_examples=25, deadline=None)
@given(chunks=st.integers(1, 5), tail=st.integers(1, STEP))
def test_each_on_chunk_comes_after_its_copies_and_before_the_next(chunks: int, tail: int) -> None:
    step = STEP
    n = (chunks - 1) * step + tail
    assume(n > MiB)  # up to 1 MiB goes in one direct copy, without staging
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, n, dtype=np.uint8)
    log: list[str] = []
    device = bytearray(n)

    def memcpy(dst: int, srcaddr: int, m: int, stream: str) -> tuple[int]:
        log.append(f"copy {dst}+{m}")
        device[dst : dst + m] = staging[srcaddr][:m].tobytes()
        return (0,)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(_backend, "driver", lambda: SimpleNamespace(cuMemcpyHtoDAsync=memcpy))
        mp.setattr(_backend, "check", lambda result, what: None)
        mp.setattr(_backend, "_event_sync", lambda ev, what: log.append(f"wait {ev}"))
        mp.setattr(_backend, "_record", lambda stream, ev: log.append(f"record {ev}"))
        with ThreadPoolExecutor(4) as pool:
            b = _backend_for_copies(log, step, pool)
            staging = {pinned.address: pinned.array for pinned, _ in b._staging}
            b._copy_in(0, src.data, lambda done: log.append(f"on_chunk {done}"))
    finally:
        mp.undo()
    assert bytes(device) == src.tobytes()  # each chunk was whole in staging when its copy queued
    steps = [(off, min(step, n - off)) for off in range(0, n, step)]
    want: list[str] = []
    for i, (off, m) in enumerate(steps):
        want.append(f"wait done{i % 2}")
        if i:
            want.append(f"on_chunk {off}")  # the chunk before: while this one is staged
        want += [f"copy {off}+{m}", f"record done{i % 2}"]
    want += [f"on_chunk {n}", "sync copy"]
    assert log == want


def test_an_on_chunk_error_drains_the_copy_stream_and_leaves_no_copier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log: list[str] = []

    def memcpy(dst: int, srcaddr: int, m: int, stream: str) -> tuple[int]:
        log.append(f"copy {dst}+{m}")
        return (0,)

    monkeypatch.setattr(_backend, "driver", lambda: SimpleNamespace(cuMemcpyHtoDAsync=memcpy))
    monkeypatch.setattr(_backend, "check", lambda result, what: None)
    monkeypatch.setattr(_backend, "_event_sync", lambda ev, what: log.append(f"wait {ev}"))
    monkeypatch.setattr(_backend, "_record", lambda stream, ev: log.append(f"record {ev}"))
    submitted: list[Any] = []

    class Pool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            f = super().submit(fn, *args, **kwargs)
            submitted.append(f)
            return f

    def on_chunk(done: int) -> None:
        raise RuntimeError(f"launch failed at {done}")

    with Pool(4) as pool:
        b = _backend_for_copies(log, 4 * MiB, pool)
        src = np.ones(12 * MiB, dtype=np.uint8)
        with pytest.raises(RuntimeError, match=f"launch failed at {4 * MiB}"):
            b._copy_in(0, src.data, on_chunk)
        assert submitted and all(f.done() for f in submitted)
    # The error came while chunk 1 was staged: its copy was never queued; the stream was drained.
    assert log == ["wait done0", f"copy 0+{4 * MiB}", "record done0", "wait done1", "sync copy"]


def test_a_staged_one_copy_seal_fills_the_buffer_then_seals_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_seal_staged`` (pageable bytes that fit one staging buffer): the buffer is waited for,
    filled whole, and ``_seal_one_copy`` reads it with the staging lock still held (the buffer is
    not reused before that seal has synchronized)."""
    log: list[str] = []
    monkeypatch.setattr(_backend, "_event_sync", lambda ev, what: log.append(f"wait {ev}"))
    src = np.random.default_rng(3).integers(0, 256, 3 * MiB + 5, dtype=np.uint8)
    with ThreadPoolExecutor(4) as pool:
        b = _backend_for_copies(log, 4 * MiB, pool)
        job = object()

        def seal_one_copy(j: object, addr: int, keep: object) -> str:
            pinned = b._staging[0][0]
            assert j is job and addr == pinned.address and b._staging_lock.locked()
            assert np.array_equal(pinned.array[: len(src)], src)
            log.append("seal from staging 0")
            return "sealed"

        b._seal_one_copy = seal_one_copy
        assert b._seal_staged(job, src) == "sealed"
    assert log == ["wait done0", "seal from staging 0"]
    assert not b._staging_lock.locked()
