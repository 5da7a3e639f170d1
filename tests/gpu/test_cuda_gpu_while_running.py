"""``digest_many(while_running=...)`` on the GPU (issues 11, 15): on every CUDA path (the tuned
single-segment path, the segment-table lanes at normal and low priority, nh-fast-v1 alone, a table
mixing nh-fast-v1 with the batched algorithms, an empty table) the digests are those of the host
reference, the callback runs exactly once, on the calling thread, and a raising callback
propagates and leaves the backend usable: nothing held (another thread digests at once, the
buffers free) and the next digest of every path correct. Through the store: a planned verify of
the same batch, with and without an edit racing the digests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vram_residency.backends.base import Segment
from vram_residency.backends.cuda import CudaBackend, CudaBuffer, _nh_fast
from vram_residency.errors import InvalidInput
from vram_residency.formats.tree import BLAKE3, NH_FAST_V1, SHA256_TREE_V1, UNIT_SIZE, digest_only

pytestmark = pytest.mark.gpu

MiB = UNIT_SIZE
KEY = bytes(range(40, 72))


class _Boom(RuntimeError):
    pass


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture
def buffers(cuda_backend: CudaBackend) -> Iterator[tuple[list[CudaBuffer], list[bytes]]]:
    lengths = [1, 4097, MiB, 3 * MiB + 5, 64 * MiB + 12345]
    payloads = [_bytes(n, 300 + i) for i, n in enumerate(lengths)]
    bufs = [cuda_backend.allocate(n) for n in lengths]
    try:
        for b, p in zip(bufs, payloads, strict=True):
            b.write(0, p)
        yield bufs, payloads
    finally:
        for b in bufs:
            b.close()


def _tables(bufs: list[CudaBuffer], payloads: list[bytes]) -> dict[str, tuple[list[Segment], str]]:
    """Each path's table (segments, priority)."""
    sized = list(zip(bufs, payloads, strict=True))
    big_buf, big = sized[-1]
    mixed = [
        Segment(b, len(p), alg, os.urandom(32) if alg == NH_FAST_V1 else None)
        for b, p in sized
        for alg in (SHA256_TREE_V1, NH_FAST_V1, BLAKE3)
    ]
    return {
        # one unkeyed sha256-tree-v1 / blake3 segment at normal priority: _hash_buffer
        "single blake3": ([Segment(big_buf, len(big), BLAKE3)], "normal"),
        "single sha256": ([Segment(big_buf, len(big), SHA256_TREE_V1)], "normal"),
        # the segment-table lanes (_run_batch, _Lane.run), a keyed BLAKE3 entry among them
        "table": ([Segment(b, len(p), a) for b, p in sized for a in (SHA256_TREE_V1, BLAKE3)], "normal"),
        "table keyed": ([Segment(big_buf, len(big), BLAKE3, KEY)], "normal"),
        "table low": ([Segment(b, len(p), BLAKE3) for b, p in sized], "low"),
        # nh-fast-v1 alone (_nh_fast._queue_and_wait), one segment and several
        "nh-fast one": ([Segment(big_buf, len(big), NH_FAST_V1, KEY)], "normal"),
        "nh-fast many": ([Segment(b, len(p), NH_FAST_V1, os.urandom(32)) for b, p in sized], "normal"),
        # both sub-batches of _run_mixed: the callback runs once, in the last
        "mixed": (mixed, "normal"),
        "empty": ([], "normal"),
    }


def _want(segs: list[Segment], payloads: dict[int, bytes]) -> list[bytes]:
    return [digest_only(payloads[id(s.buf)][: s.length], s.algorithm, key=s.key) for s in segs]


PATHS = ["single blake3", "single sha256", "table", "table keyed", "table low", "nh-fast one"]
PATHS += ["nh-fast many", "mixed", "empty"]


@pytest.fixture(params=[False, True], ids=["host-finish", "device-finish"])
def finish_on_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    # nh-fast-v1 verify digests are finished on the device from DEVICE_FINISH_UNITS units on
    # (4 GiB); both ways are tested at every size.
    if request.param:
        monkeypatch.setattr(_nh_fast, "DEVICE_FINISH_UNITS", 1)
    return bool(request.param)


@pytest.mark.parametrize("path", PATHS)
def test_digests_unchanged_and_called_once(
    cuda_backend: CudaBackend,
    buffers: tuple[list[CudaBuffer], list[bytes]],
    finish_on_device: bool,
    path: str,
) -> None:
    bufs, payloads = buffers
    segs, priority = _tables(bufs, payloads)[path]
    want = _want(segs, {id(b): p for b, p in zip(bufs, payloads, strict=True)})
    calls: list[str] = []

    def note() -> None:
        calls.append(threading.current_thread().name)

    got = cuda_backend.digest_many(segs, priority=priority, while_running=note)  # type: ignore[arg-type]
    assert got == want
    assert calls == [threading.current_thread().name]
    # and without a callback, the same
    assert cuda_backend.digest_many(segs, priority=priority) == want  # type: ignore[arg-type]


def _usable(cuda_backend: CudaBackend, bufs: list[CudaBuffer], payloads: list[bytes]) -> None:
    """Every path digests correctly again, and from another thread at once (no lock held)."""
    by_buf = {id(b): p for b, p in zip(bufs, payloads, strict=True)}
    for segs, priority in _tables(bufs, payloads).values():
        assert cuda_backend.digest_many(segs, priority=priority) == _want(segs, by_buf)  # type: ignore[arg-type]
    results: list[object] = []

    def other() -> None:
        try:
            seg = Segment(bufs[2], len(payloads[2]), BLAKE3)
            results.append(cuda_backend.digest_many([seg]) == _want([seg], by_buf))
        except BaseException as exc:
            results.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(30)
    assert results == [True]
    for b in bufs:
        assert not b._lock.locked()


@pytest.mark.parametrize("path", PATHS)
def test_a_raising_callback_propagates_and_leaves_the_backend_usable(
    cuda_backend: CudaBackend,
    buffers: tuple[list[CudaBuffer], list[bytes]],
    finish_on_device: bool,
    path: str,
) -> None:
    bufs, payloads = buffers
    segs, priority = _tables(bufs, payloads)[path]
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        raise _Boom("callback failed")

    with pytest.raises(_Boom, match="callback failed"):
        cuda_backend.digest_many(segs, priority=priority, while_running=boom)  # type: ignore[arg-type]
    assert calls == [1]
    _usable(cuda_backend, bufs, payloads)


def test_a_refused_table_does_not_call_it(
    cuda_backend: CudaBackend, buffers: tuple[list[CudaBuffer], list[bytes]]
) -> None:
    bufs, payloads = buffers
    calls: list[int] = []
    bad: list[Callable[[], Segment]] = [
        lambda: Segment(bufs[0], bufs[0].size + 1, BLAKE3),
        lambda: Segment(bufs[0], 1, NH_FAST_V1),  # no key
        lambda: Segment(bufs[0], 1, "md5"),
    ]
    for make in bad:
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many(
                [Segment(bufs[1], 10, BLAKE3), make()], while_running=lambda: calls.append(1)
            )
    assert calls == []
    _usable(cuda_backend, bufs, payloads)


@pytest.mark.parametrize("alg", [SHA256_TREE_V1, BLAKE3, NH_FAST_V1])
def test_planned_verify_on_the_gpu_overlaps_and_refuses_an_edit(alg: str) -> None:
    # The store's planned verify through the real CUDA backend: passes while intact, names the
    # edited shard (tag) when an object of the plan is edited, a flipped bit by its range.
    from vram_residency import SealVerificationFailed, VramManager
    from vram_residency.testing import flip_bit

    with VramManager("overlap-gpu-token-0123456789abcdef", backend="cuda", fast_check=True) as mgr:
        shards = [mgr.seal_model(_bytes(3 * MiB + 17 * i, 500 + i), digest_algorithm=alg) for i in range(5)]
        for _ in range(3):
            mgr.verify_many(shards)
            mgr.verify_many(shards, check="fast")
        assert mgr.store._plans
        tag = shards[3].tag
        object.__setattr__(shards[3], "_signature", shards[0].tag)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [shards[3].shard_id] and not info.value.tag_valid
        object.__setattr__(shards[3], "_signature", tag)
        mgr.verify_many(shards)
        mgr.verify_many(shards)
        flip_bit(mgr, shards[1], 8 * MiB + 5)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [shards[1].shard_id]
        assert info.value.failures[0].corrupted_ranges == ((MiB, 2 * MiB),)
