"""HostPool, the pool of released pinned offload copies, on plain host buffers (its logic does
not depend on what the buffers are; the CUDA backend pools PinnedHostBuffers with it)."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.cuda._staging import HostPool

MiB = 1 << 20


class Plain:
    """A host buffer with a size, as the pool sees a PinnedHostBuffer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)


def make(limit: int) -> tuple[HostPool[Plain], list[Plain]]:
    freed: list[Plain] = []
    return HostPool(limit, freed.append), freed


def test_empty_pool_gives_nothing() -> None:
    pool, freed = make(8 * MiB)
    assert pool.take(MiB) is None
    assert len(pool) == 0 and pool.pooled_bytes == 0 and not freed


def test_given_buffer_is_reused_for_a_fitting_size() -> None:
    pool, freed = make(8 * MiB)
    b = Plain(2 * MiB)
    pool.give(b)
    assert pool.pooled_bytes == 2 * MiB
    assert pool.take(2 * MiB) is b
    assert pool.take(2 * MiB) is None  # taken once only
    assert not freed


def test_best_fit_and_at_most_twice_the_size() -> None:
    pool, _ = make(64 * MiB)
    small, mid, big = Plain(3 * MiB), Plain(5 * MiB), Plain(20 * MiB)
    for b in (big, mid, small):
        pool.give(b)
    assert pool.take(4 * MiB) is mid  # smallest of at least 4 MiB (3 MiB is too small)
    assert pool.take(9 * MiB) is None  # 20 MiB is more than twice 9 MiB: not spent on it
    assert pool.take(10 * MiB) is big
    assert pool.take(MiB) is None  # 3 MiB > 2 x 1 MiB
    assert pool.take(3 * MiB) is small


def test_limit_drops_oldest_and_frees_oversized() -> None:
    pool, freed = make(6 * MiB)
    a, b, c = Plain(2 * MiB), Plain(3 * MiB), Plain(3 * MiB)
    pool.give(a)
    pool.give(b)
    pool.give(c)  # 8 MiB would exceed 6: the oldest (a) goes
    assert freed == [a]
    assert pool.pooled_bytes == 6 * MiB
    huge = Plain(7 * MiB)
    pool.give(huge)  # larger than the whole limit: freed at once, the pool untouched
    assert freed == [a, huge]
    assert pool.pooled_bytes == 6 * MiB


def test_zero_limit_pools_nothing() -> None:
    pool, freed = make(0)
    b = Plain(MiB)
    pool.give(b)
    assert freed == [b] and pool.take(MiB) is None


def test_clear_frees_all_and_later_gives_free_at_once() -> None:
    pool, freed = make(8 * MiB)
    a, b = Plain(MiB), Plain(2 * MiB)
    pool.give(a)
    pool.give(b)
    pool.clear()
    assert freed == [a, b] and len(pool) == 0
    c = Plain(MiB)
    pool.give(c)  # a copy discarded after the backend closed
    assert freed == [a, b, c] and pool.take(MiB) is None


def test_free_failure_frees_the_rest_then_raises() -> None:
    freed: list[Plain] = []

    def free(b: Plain) -> None:
        freed.append(b)
        if b.size == MiB:
            raise OSError("free failed")

    pool = HostPool(8 * MiB, free)
    a, b = Plain(MiB), Plain(2 * MiB)
    pool.give(a)
    pool.give(b)
    with pytest.raises(OSError, match="free failed"):
        pool.clear()
    assert freed == [a, b]


@pytest.mark.parametrize("limit", [-1, 1.5, True, "8"])
def test_bad_limit(limit: object) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        HostPool(limit, lambda b: None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 16)), max_size=40), st.integers(0, 40))
def test_every_buffer_is_pooled_taken_or_freed_exactly_once(ops: list[tuple[bool, int]], limit: int) -> None:
    """Under any sequence of gives and takes: never over the limit, every taken buffer fits the
    request, and each buffer ends up in exactly one place (pooled, held by a taker, or freed)."""
    pool, freed = make(limit)
    held: list[Plain] = []
    for give, size in ops:
        if give:
            pool.give(Plain(size))
        else:
            got = pool.take(size)
            if got is not None:
                assert size <= got.size <= 2 * size
                held.append(got)
        assert pool.pooled_bytes <= limit
    pool.clear()
    ids = [id(b) for b in freed] + [id(b) for b in held]
    assert len(ids) == len(set(ids))
    assert len(freed) + len(held) == sum(1 for g, _ in ops if g)


def test_concurrent_give_and_take() -> None:
    pool, _freed = make(64 * MiB)
    taken: list[Plain] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for _ in range(200):
            pool.give(Plain(MiB + i))
            b = pool.take(MiB + i)
            if b is not None:
                with lock:
                    taken.append(b)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(b) for b in taken}) == len(taken)  # no buffer handed to two takers
    assert pool.pooled_bytes <= 64 * MiB


def test_take_waits_for_a_fitting_buffer_on_its_way_back() -> None:
    """A restore zeroes its copy on a background thread; an offload asking meanwhile gets that
    buffer when it arrives rather than page-locking new memory."""
    pool, freed = make(8 * MiB)
    b = Plain(2 * MiB)
    pool.returning(b)
    t = threading.Timer(0.2, pool.give, args=(b,))
    t0 = time.monotonic()
    t.start()
    got = pool.take(2 * MiB)
    t.join()
    assert got is b
    assert time.monotonic() - t0 >= 0.15
    assert not freed


def test_take_does_not_wait_for_a_buffer_that_would_not_fit() -> None:
    pool, _ = make(64 * MiB)
    pool.returning(Plain(32 * MiB))  # more than twice the request
    t0 = time.monotonic()
    assert pool.take(MiB) is None
    assert time.monotonic() - t0 < 0.1
    small, _ = make(8 * MiB)  # fits the request but not the pool's limit
    small.returning(Plain(16 * MiB))
    assert small.take(16 * MiB) is None


def test_cancel_wakes_the_waiter_with_nothing() -> None:
    pool, _ = make(8 * MiB)
    b = Plain(MiB)
    pool.returning(b)
    t = threading.Timer(0.1, pool.cancel, args=(b,))
    t.start()
    assert pool.take(MiB) is None
    t.join()


def test_wait_is_bounded() -> None:
    freed: list[Plain] = []
    pool = HostPool(8 * MiB, freed.append, wait_s=0.1)
    pool.returning(Plain(MiB))  # never given back
    t0 = time.monotonic()
    assert pool.take(MiB) is None
    assert 0.05 <= time.monotonic() - t0 < 2


def test_a_buffer_given_twice_is_pooled_once() -> None:
    """A second give of a buffer already pooled must not pool it again: two later takes would
    otherwise get the same memory, and two offloads would write their shards over each other."""
    pool, freed = make(8 * MiB)
    b = Plain(2 * MiB)
    pool.give(b)
    pool.give(b)
    assert len(pool) == 1 and pool.pooled_bytes == 2 * MiB
    assert pool.take(2 * MiB) is b
    assert pool.take(2 * MiB) is None
    pool.clear()
    assert not freed  # taken, so not freed by the pool


def test_large_host_copies_are_zeroed_even_when_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large offload copy is zeroed by several threads; when none can be started (interpreter
    shutdown: a manager closed from a finalizer), it must still be zeroed, on the caller's thread,
    not freed with the model's bytes in it."""
    import concurrent.futures.thread as cft
    import ctypes

    from vram_residency.backends.cuda._backend import _PARALLEL_ZERO_MIN, _zero_host

    size = _PARALLEL_ZERO_MIN + 4096
    raw = (ctypes.c_ubyte * size)()
    ctypes.memset(ctypes.addressof(raw), 0xAB, size)
    monkeypatch.setattr(cft, "_shutdown", True)  # what the interpreter sets at exit
    _zero_host(ctypes.addressof(raw), size)
    assert not any(memoryview(raw).cast("B"))
