"""The ``while_running`` contract of ``Backend.digest_many`` on the host backend (issues 11, 15):
called exactly once per call, on every path of the table (one task, a thread pool, a large
segment, low priority, an empty table); not called when the table is refused before any work;
its exception propagates after every task has finished, leaving nothing held (the buffers close
cleanly, a following digest is correct)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from vram_residency.backends.base import Backend, Priority, Segment, WhileRunning
from vram_residency.backends.host import HostBackend, HostBuffer
from vram_residency.errors import InvalidInput
from vram_residency.formats import nhfast
from vram_residency.formats.tree import BLAKE3, NH_FAST_V1, SHA256_TREE_V1, UNIT_SIZE, digest_only

MiB = UNIT_SIZE
KEY = bytes(range(3, 35))


class _Boom(RuntimeError):
    pass


def _filled(backend: HostBackend, sizes: list[int], seed: int) -> list[HostBuffer]:
    rng = np.random.default_rng(seed)
    bufs = []
    for n in sizes:
        b = backend.allocate(n)
        b.write(0, rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        bufs.append(b)
    return bufs


def _table(bufs: list[HostBuffer]) -> list[Segment]:
    algs = [SHA256_TREE_V1, BLAKE3, NH_FAST_V1]
    segs = []
    for i, b in enumerate(bufs):
        alg = algs[i % 3]
        segs.append(Segment(b, b.size, alg, KEY if alg == NH_FAST_V1 else None))
    return segs


def _expected(segs: list[Segment]) -> list[bytes]:
    out = []
    for s in segs:
        view = s.buf.host_view(s.length)
        try:
            out.append(digest_only(view, s.algorithm, key=s.key))
        finally:
            view.release()
    return out


# (sizes, priority): one task; several tasks (the pool, where there is more than one core);
# a segment large enough to be hashed alone with every core; the low-priority (one thread) path.
CASES = [
    ([100, 4097, 3 * MiB + 5], "normal"),
    ([5 * MiB, 6 * MiB, 7 * MiB, 1, 9 * MiB + 3], "normal"),
    ([65 * MiB, 1000, 2 * MiB], "normal"),
    ([5 * MiB, 6 * MiB, 7 * MiB + 1], "low"),
]


@pytest.mark.parametrize(("sizes", "priority"), CASES)
def test_called_once_and_digests_unchanged(sizes: list[int], priority: str) -> None:
    backend = HostBackend(0, 512 * MiB)
    try:
        bufs = _filled(backend, sizes, seed=len(sizes))
        segs = _table(bufs)
        want = _expected(segs)
        calls: list[str] = []

        def note() -> None:
            calls.append(threading.current_thread().name)

        got = backend.digest_many(segs, priority=priority, while_running=note)  # type: ignore[arg-type]
        assert got == want
        # Once, on the calling thread (never on a pool thread).
        assert calls == [threading.current_thread().name]
        assert backend.digest_many(segs, priority=priority) == want  # type: ignore[arg-type]
    finally:
        backend.close()


def test_an_empty_table_calls_it_once() -> None:
    backend = HostBackend(0, MiB)
    calls: list[int] = []
    assert backend.digest_many([], while_running=lambda: calls.append(1)) == []
    assert calls == [1]


@pytest.mark.parametrize(
    "bad",
    [
        lambda b: Segment(b, b.size + 1, BLAKE3),  # out of range
        lambda b: Segment(b, b.size, "md5"),  # no such algorithm
        lambda b: Segment(b, b.size, NH_FAST_V1),  # a keyed algorithm without its key
        lambda b: "not a segment",
    ],
)
def test_a_refused_table_does_not_call_it(bad: object) -> None:
    backend = HostBackend(0, 64 * MiB)
    try:
        (buf, other) = _filled(backend, [4096, 8192], seed=5)
        calls: list[int] = []
        with pytest.raises(InvalidInput):
            backend.digest_many(
                [Segment(other, other.size, SHA256_TREE_V1), bad(buf)],  # type: ignore[operator]
                while_running=lambda: calls.append(1),
            )
        assert calls == []
    finally:
        backend.close()


@pytest.mark.parametrize(("sizes", "priority"), CASES)
def test_a_raising_callback_propagates_and_leaves_nothing_held(sizes: list[int], priority: str) -> None:
    backend = HostBackend(0, 512 * MiB)
    try:
        bufs = _filled(backend, sizes, seed=7)
        segs = _table(bufs)
        want = _expected(segs)
        calls: list[int] = []

        def boom() -> None:
            calls.append(1)
            raise _Boom("callback failed")

        with pytest.raises(_Boom, match="callback failed"):
            backend.digest_many(segs, priority=priority, while_running=boom)  # type: ignore[arg-type]
        assert calls == [1]
        # No pool thread still reads the buffers, no view of them is alive: the next call is
        # correct and every buffer closes (a live view would make close() raise).
        assert backend.digest_many(segs, priority=priority) == want  # type: ignore[arg-type]
        assert [t for t in threading.enumerate() if t.name.startswith("vram-hash")] == []
        free_before = backend.mem_info()[0]
        for b in bufs:
            b.close()
        assert backend.mem_info()[0] > free_before
    finally:
        backend.close()


def test_the_default_implementation_honours_it() -> None:
    # Backend.digest_many's default (one digest after another, for backends without tables).
    class OneByOne(HostBackend):
        def digest_many(
            self,
            segments: Sequence[Segment],
            *,
            priority: Priority = "normal",
            while_running: WhileRunning | None = None,
        ) -> list[bytes]:
            return Backend.digest_many(self, segments, priority=priority, while_running=while_running)

    backend = OneByOne(0, 64 * MiB)
    try:
        segs = _table(_filled(backend, [10, 3 * MiB + 1, 4096], seed=9))
        calls: list[int] = []
        assert backend.digest_many(segs, while_running=lambda: calls.append(1)) == _expected(segs)
        assert calls == [1]
        with pytest.raises(_Boom):
            backend.digest_many(segs, while_running=lambda: (_ for _ in ()).throw(_Boom()))
        assert backend.digest_many(segs) == _expected(segs)
    finally:
        backend.close()


def test_nh_fast_entry_is_the_reference_digest() -> None:
    # The nh-fast-v1 entries above are compared with digest_only; tie that to the spec's
    # pure-Python reference once, so that a mistake shared by both could not hide.
    backend = HostBackend(0, 8 * MiB)
    try:
        data = np.random.default_rng(11).integers(0, 256, 2 * 4096 + 17, dtype=np.uint8).tobytes()
        buf = backend.allocate(len(data))
        buf.write(0, data)
        got = backend.digest_many([Segment(buf, len(data), NH_FAST_V1, KEY)], while_running=lambda: None)
        assert got == [nhfast.reference_hash(data, KEY)[0]]
    finally:
        backend.close()
