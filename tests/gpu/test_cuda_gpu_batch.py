"""Segment tables on the GPU (issue 11): digest_many/hash_many equal the per-segment path and the
host reference bit for bit, on mixed algorithms, edge lengths, thousands of segments, keyed
BLAKE3 (issue 14's probe) and the low-priority lane."""

from __future__ import annotations

import os
import threading
import time

import blake3
import numpy as np
import pytest

from vram_residency.backends.base import Segment
from vram_residency.backends.cuda import CudaBackend, open_backend
from vram_residency.backends.cuda import _backend as cuda_backend_module
from vram_residency.errors import IntegrityViolation, InvalidInput
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE, hash_units

pytestmark = pytest.mark.gpu

MiB = UNIT_SIZE
KEY = bytes(range(7, 39))
EDGE = [0, 1, 1023, 1024, 1025, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 2 * MiB + 1025, 5 * MiB + 12345]


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("priority", ["normal", "low"])
def test_batched_equals_per_segment_and_host(cuda_backend: CudaBackend, priority: str) -> None:
    datas, segs, bufs = [], [], []
    try:
        for i, n in enumerate(EDGE * 2):
            alg = (SHA256_TREE_V1, BLAKE3)[i % 2]
            key = KEY if alg == BLAKE3 and i % 4 == 3 else None
            data = random_bytes(n, seed=1000 + i)
            buf = cuda_backend.allocate(max(1, n + (i % 3) * 100))  # some buffers longer than n
            bufs.append(buf)
            if n:
                buf.write(0, data)
            datas.append(data)
            segs.append(Segment(buf, n, alg, key))
        digests = cuda_backend.digest_many(segs, priority=priority)  # type: ignore[arg-type]
        hashed = cuda_backend.hash_many(segs, priority=priority)  # type: ignore[arg-type]
        for s, data, d, h in zip(segs, datas, digests, hashed, strict=True):
            want = hash_units(data, s.algorithm, key=s.key)
            assert h == want, (s.algorithm, s.length, s.key is not None)
            assert d == want.digest
            if s.key is None:
                assert cuda_backend.digest(s.buf, s.algorithm, s.length) == d
                assert cuda_backend.hash(s.buf, s.algorithm, s.length) == h
    finally:
        for b in bufs:
            b.close()


def test_thousands_of_small_segments(cuda_backend: CudaBackend) -> None:
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(0, 300_000, size=2000)]
    lengths[:6] = [0, 1, MiB, MiB - 1, 4096, 1025]
    bufs, segs, datas = [], [], []
    try:
        for i, n in enumerate(lengths):
            data = random_bytes(n, seed=i)
            buf = cuda_backend.allocate(max(1, n))
            if n:
                buf.write(0, data)
            bufs.append(buf)
            datas.append(data)
            segs.append(Segment(buf, n, SHA256_TREE_V1 if i % 3 else BLAKE3))
        got = cuda_backend.digest_many(segs)
        assert got == [hash_units(d, s.algorithm).digest for d, s in zip(datas, segs, strict=True)]
    finally:
        for b in bufs:
            b.close()


@pytest.mark.parametrize("alg", [SHA256_TREE_V1, BLAKE3])
def test_a_flip_in_one_segment_among_many(cuda_backend: CudaBackend, alg: str) -> None:
    n = 3 * MiB + 77
    bufs = [cuda_backend.allocate(n) for _ in range(64)]
    try:
        for i, b in enumerate(bufs):
            b.write(0, random_bytes(n, seed=i))
        segs = [Segment(b, n, alg) for b in bufs]
        before = cuda_backend.hash_many(segs)
        victim = bufs[41]
        byte = victim.read(2 * MiB + 5, 1)[0]
        victim.write(2 * MiB + 5, bytes([byte ^ 0x04]))
        after = cuda_backend.digest_many(segs)
        assert [i for i in range(64) if after[i] != before[i].digest] == [41]
        located = cuda_backend.hash_many([segs[41]])[0]
        assert [u for u in range(4) if located.unit(u) != before[41].unit(u)] == [2]
    finally:
        for b in bufs:
            b.close()


@pytest.mark.parametrize(
    "n", [0, 1, 1023, 1024, 1025, 4096, MiB - 1, MiB, MiB + 1, 3 * MiB + 5, 257 * MiB + 3]
)
def test_keyed_blake3_matches_package(cuda_backend: CudaBackend, n: int) -> None:
    data = random_bytes(n, seed=n + 5)
    buf = cuda_backend.allocate(max(1, n))
    try:
        if n:
            buf.write(0, data)
        key = bytes(np.random.default_rng(n).integers(0, 256, size=32, dtype=np.uint8))
        assert cuda_backend.digest(buf, BLAKE3, n, key=key) == blake3.blake3(data, key=key).digest()
        if n <= 8 * MiB:
            assert cuda_backend.hash(buf, BLAKE3, n, key=key) == hash_units(data, BLAKE3, key=key)
        assert cuda_backend.digest(buf, BLAKE3, n, key=bytes(32)) != cuda_backend.digest(buf, BLAKE3, n)
    finally:
        buf.close()


def test_bad_segments_are_refused(cuda_backend: CudaBackend) -> None:
    buf = cuda_backend.allocate(100)
    try:
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many([Segment(buf, 100, SHA256_TREE_V1, KEY)])
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many([Segment(buf, 100, BLAKE3, b"short")])
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many([Segment(buf, 101, BLAKE3)])
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many([Segment(buf, 10, "md5")])
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many([Segment(buf, 10, BLAKE3)], priority="urgent")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            cuda_backend.digest_many([(buf, 10, BLAKE3)])  # type: ignore[list-item]
        assert cuda_backend.digest_many([]) == []
        assert cuda_backend.hash_many([]) == []
    finally:
        buf.close()
    with pytest.raises(IntegrityViolation):
        cuda_backend.digest_many([Segment(buf, 10, BLAKE3)])


def test_same_buffer_in_several_segments(cuda_backend: CudaBackend) -> None:
    data = random_bytes(2 * MiB + 9, seed=77)
    buf = cuda_backend.allocate(len(data))
    try:
        buf.write(0, data)
        lengths = [len(data), 5, MiB, 0, len(data)]
        got = cuda_backend.digest_many([Segment(buf, m, BLAKE3) for m in lengths])
        assert got == [blake3.blake3(data[:m]).digest() for m in lengths]
    finally:
        buf.close()


@pytest.mark.parametrize("wait", ["block", "poll"])
def test_low_priority_wait_leaves_the_gil_free(
    cuda_backend: CudaBackend, monkeypatch: pytest.MonkeyPatch, wait: str
) -> None:
    """While a low-priority pass runs (about 30 ms of sha256-tree-v1 kernels), another Python
    thread keeps running at close to its solo speed: the wait holds no GIL, whether it blocks in
    cuEventSynchronize (the default) or polls with sleeps (LOW_WAIT)."""
    monkeypatch.setattr(cuda_backend_module, "LOW_WAIT", wait)
    # A lane takes LOW_WAIT when it is built: a backend of its own, opened under this mode.
    with open_backend(cuda_backend.device) as backend:
        _gil_free_during_low_pass(backend, blocking=wait == "block")


def _gil_free_during_low_pass(cuda_backend: CudaBackend, *, blocking: bool) -> None:
    buf = cuda_backend.allocate(1 << 30)
    try:
        segs = [Segment(buf, 1 << 30, SHA256_TREE_V1)] * 24
        cuda_backend.digest_many(segs, priority="low")  # warm: compile, arena, pinned buffer
        assert cuda_backend._lane("low").blocking_wait is blocking

        def spin_until(ev: threading.Event) -> tuple[int, float]:
            # The same loop body alone and beside the scrub, so that the rates compare.
            count, start = 0, time.perf_counter()
            while not ev.is_set():
                count += 1
            return count, time.perf_counter() - start

        alone = threading.Event()
        timer = threading.Timer(0.05, alone.set)
        timer.start()
        n_alone, t_alone = spin_until(alone)
        solo_rate = n_alone / t_alone
        done = threading.Event()
        took: list[float] = []

        def scrub() -> None:
            t = time.perf_counter()
            cuda_backend.digest_many(segs, priority="low")
            took.append(time.perf_counter() - t)
            done.set()

        th = threading.Thread(target=scrub)
        th.start()
        count, elapsed = spin_until(done)
        th.join()
        assert took[0] > 0.005  # the pass really ran for a while
        assert count / elapsed >= 0.3 * solo_rate, (count / elapsed, solo_rate)
    finally:
        buf.close()


def test_low_and_normal_lanes_concurrently(cuda_backend: CudaBackend) -> None:
    datas = [random_bytes(3 * MiB + i, seed=i) for i in range(8)]
    bufs = [cuda_backend.allocate(len(d)) for d in datas]
    try:
        for b, d in zip(bufs, datas, strict=True):
            b.write(0, d)
        want = [hash_units(d, BLAKE3).digest for d in datas]
        errors: list[BaseException] = []

        def worker(priority: str, rounds: int) -> None:
            try:
                for r in range(rounds):
                    segs = [Segment(b, len(d), BLAKE3) for b, d in zip(bufs, datas, strict=True)]
                    order = segs[r % 8 :] + segs[: r % 8]
                    got = cuda_backend.digest_many(order, priority=priority)  # type: ignore[arg-type]
                    assert got == want[r % 8 :] + want[: r % 8]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(p, 30)) for p in ("low", "normal", "low")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        for b in bufs:
            b.close()


def test_adopted_torch_style_pointers(cuda_backend: CudaBackend) -> None:
    """Segments of adopted memory (as seal_tensors makes them) hash like owned ones."""
    owner = cuda_backend.allocate(4 * MiB)
    try:
        data = random_bytes(4 * MiB, seed=9)
        owner.write(0, data)
        views = [cuda_backend.adopt_pointer(owner.device_pointer + off, MiB) for off in (0, MiB, 3 * MiB)]
        got = cuda_backend.hash_many([Segment(v, MiB, SHA256_TREE_V1) for v in views])
        assert [g.digest for g in got] == [
            hash_units(data[o : o + MiB], SHA256_TREE_V1).digest for o in (0, MiB, 3 * MiB)
        ]
        for v in views:
            v.close()
    finally:
        owner.close()


def test_reused_plan_takes_each_calls_keys(cuda_backend: CudaBackend) -> None:
    # The lane reuses a table's plan whatever its keys' bytes (an attestation's probe key is new
    # for every nonce): each call must still hash under its own keys, in its own order.
    data = os.urandom(3 * (1 << 20) + 5)
    buf = cuda_backend.allocate(len(data))
    try:
        buf.write(0, data)
        for _ in range(3):
            k1, k2 = os.urandom(32), os.urandom(32)
            segs = [
                Segment(buf, len(data), BLAKE3, k1),
                Segment(buf, 1000, BLAKE3, k2),
                Segment(buf, 7, BLAKE3, k1),
            ]
            got = cuda_backend.digest_many(segs)
            assert got == [
                blake3.blake3(data, key=k1).digest(),
                blake3.blake3(data[:1000], key=k2).digest(),
                blake3.blake3(data[:7], key=k1).digest(),
            ]
            # The same shape with the keys swapped: first appearance is now k2.
            swapped = [
                Segment(buf, len(data), BLAKE3, k2),
                Segment(buf, 1000, BLAKE3, k1),
                Segment(buf, 7, BLAKE3, k2),
            ]
            assert cuda_backend.digest_many(swapped) == [
                blake3.blake3(data, key=k2).digest(),
                blake3.blake3(data[:1000], key=k1).digest(),
                blake3.blake3(data[:7], key=k2).digest(),
            ]
    finally:
        buf.close()
