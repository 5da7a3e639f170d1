"""CUDA graphs of repeated sha256-tree-v1 and blake3 digests (``_backend.GRAPHS``): a key seen
twice is captured on its third call and launched from then on (``_graphs.GraphCache``). Each
test checks the graph path against the host reference (``formats.tree``) and the direct path,
that a replay reads the bytes in VRAM when it runs (not at capture), that keyed BLAKE3 tables
read their keys at launch time (a new key at the same addresses gives the new key's digest),
and that the switch off still works and launches no graph."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.gpu.test_cuda_gpu_digests import B3_SPLIT_LENGTHS, LENGTHS, random_bytes
from vram_residency.backends.base import Priority, Segment
from vram_residency.backends.cuda import CudaBackend, _backend
from vram_residency.backends.cuda._graphs import GraphCache
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE, hash_units

pytestmark = pytest.mark.gpu

MiB = UNIT_SIZE
ALGS = (SHA256_TREE_V1, BLAKE3)
CALLS = 5  # two direct calls, the capture (and its launch), two launches


def _graphs(backend: CudaBackend, priority: str = "normal") -> GraphCache:
    with backend.kernel_session(priority) as ks:
        return ks.graphs


@pytest.fixture
def graphs_on(cuda_backend: CudaBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """GRAPHS on, and fresh graph caches for the test's lanes (real ones, as the backend makes
    them): the session's backend has served other tests, whose keys may recur here (a freed
    buffer's address comes back) with graphs already captured or evicted (and then backing
    off), so that counts of captures and launches would depend on the tests run before."""
    monkeypatch.setattr(_backend, "GRAPHS", True)
    normal = GraphCache(capacity=64, capture_stream=cuda_backend._capture_stream)
    low = GraphCache()
    monkeypatch.setattr(cuda_backend, "_graphs", normal)
    monkeypatch.setattr(cuda_backend._lane("normal"), "graphs", normal)
    monkeypatch.setattr(cuda_backend._lane("low"), "graphs", low)
    yield
    normal.close()  # every call of the test has synchronized: nothing of these is in flight
    low.close()


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("n", LENGTHS)
def test_repeated_digest_and_hash_as_graphs_equal_host_and_direct(
    cuda_backend: CudaBackend, alg: str, n: int, graphs_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(n, seed=n + 101)
    want = hash_units(data, alg)
    graphs = _graphs(cuda_backend)
    buf = cuda_backend.allocate(max(1, n))
    try:
        buf.write(0, data)
        assert [cuda_backend.digest(buf, alg, n) for _ in range(CALLS)] == [want.digest] * CALLS
        # Two direct calls, then a capture and its launch, then launches.
        assert (graphs.captured, graphs.launched) == (1, CALLS - 2)
        assert [cuda_backend.hash(buf, alg, n) for _ in range(CALLS)] == [want] * CALLS
        assert (graphs.captured, graphs.launched) == (2, 2 * (CALLS - 2))
        # The direct path, on the same buffer, gives the same and launches nothing.
        monkeypatch.setattr(_backend, "GRAPHS", False)
        launched = graphs.launched
        assert cuda_backend.digest(buf, alg, n) == want.digest
        assert cuda_backend.hash(buf, alg, n) == want
        assert graphs.launched == launched
    finally:
        buf.close()


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", [0, 1, 4097, MiB - 1, MiB, MiB + 1, 3 * MiB + 4097, 17 * MiB + 1])
def test_sha256_both_layouts_as_graphs(
    cuda_backend: CudaBackend, n: int, split: bool, graphs_on: None
) -> None:
    """The split threshold decides the launches, so it is part of the key: a graph captured for
    one layout is never launched for the other."""
    data = random_bytes(n, seed=n + 103)
    want = hash_units(data, SHA256_TREE_V1).digest
    saved = cuda_backend.split_max_units
    buf = cuda_backend.allocate(max(1, n))
    try:
        buf.write(0, data)
        for forced in (split, not split, split):
            cuda_backend.split_max_units = 1 << 30 if forced else 0
            got = [cuda_backend.digest(buf, SHA256_TREE_V1, n) for _ in range(CALLS)]
            assert got == [want] * CALLS
            assert cuda_backend.last_units_kernel.endswith("_split") == forced
    finally:
        cuda_backend.split_max_units = saved
        buf.close()


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", B3_SPLIT_LENGTHS)
def test_blake3_both_layouts_as_graphs(
    cuda_backend: CudaBackend, n: int, split: bool, graphs_on: None
) -> None:
    data = random_bytes(n, seed=n + 107)
    want = hash_units(data, BLAKE3)
    saved = cuda_backend.blake3_split_max_units
    buf = cuda_backend.allocate(max(1, n))
    try:
        buf.write(0, data)
        for forced in (split, not split):
            cuda_backend.blake3_split_max_units = 1 << 30 if forced else 0
            assert [cuda_backend.digest(buf, BLAKE3, n) for _ in range(CALLS)] == [want.digest] * CALLS
            assert cuda_backend.last_units_kernel == ("blake3_units_split" if forced else "blake3_units")
            assert [cuda_backend.hash(buf, BLAKE3, n) for _ in range(CALLS)] == [want] * CALLS
    finally:
        cuda_backend.blake3_split_max_units = saved
        buf.close()


@pytest.mark.parametrize("alg", ALGS)
def test_a_replay_reads_the_live_bytes(cuda_backend: CudaBackend, alg: str, graphs_on: None) -> None:
    n = 3 * MiB + 4097
    data = bytearray(random_bytes(n, seed=109))
    graphs = _graphs(cuda_backend)
    buf = cuda_backend.allocate(n)
    try:
        buf.write(0, bytes(data))
        first = hash_units(bytes(data), alg).digest
        assert [cuda_backend.digest(buf, alg) for _ in range(CALLS)] == [first] * CALLS
        for pos in (0, MiB + 5, n - 1):  # the first unit, a middle one, the last byte
            data[pos] ^= 0x04
            buf.write(pos, bytes([data[pos]]))
            want = hash_units(bytes(data), alg).digest
            assert want != first
            captured, launched = graphs.captured, graphs.launched
            assert cuda_backend.digest(buf, alg) == want
            assert (graphs.captured, graphs.launched) == (captured, launched + 1)  # a replay
            first = want
    finally:
        buf.close()


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("n", [1, 4097, MiB, 2 * MiB + 1025, 64 * MiB + 3])
def test_repeated_seals_into_one_buffer(cuda_backend: CudaBackend, alg: str, n: int, graphs_on: None) -> None:
    """write_and_hash's tail (join, reduction, copies back) as a graph: seals of changing bytes
    into the same buffer, from pageable memory, each equal to the host reference."""
    buf = cuda_backend.allocate(n)
    graphs = _graphs(cuda_backend)
    try:
        for i in range(CALLS):
            data = random_bytes(n, seed=n + i)
            assert cuda_backend.write_and_hash(buf, data, alg) == hash_units(data, alg)
        assert (graphs.captured, graphs.launched) == (1, CALLS - 2)  # the tail's graph
    finally:
        buf.close()


@pytest.mark.parametrize("priority", ["normal", "low"])
def test_keyed_blake3_tables_read_the_key_when_the_graph_runs(
    cuda_backend: CudaBackend, priority: Priority, graphs_on: None
) -> None:
    """A keyed table (segment-table path) again and again with the same key, then new keys at
    the same addresses: the same graph, each key's digests. The key records are zeroed in the
    lane's pinned buffer after each run."""
    sizes = [0, 1, 1025, MiB + 1, 2 * MiB + 1025, 5 * MiB + 12345]
    bufs = [cuda_backend.allocate(max(1, n)) for n in sizes]
    payloads = [random_bytes(n, seed=n + 113) for n in sizes]
    graphs = _graphs(cuda_backend, priority)
    try:
        for b, p in zip(bufs, payloads, strict=True):
            b.write(0, p)

        def check(keys: list[bytes]) -> None:
            segs = [Segment(b, len(p), BLAKE3, k) for b, p, k in zip(bufs, payloads, keys, strict=True)]
            want = [hash_units(p, BLAKE3, key=k).digest for p, k in zip(payloads, keys, strict=True)]
            assert cuda_backend.digest_many(segs, priority=priority) == want
            host = cuda_backend._lanes[priority].host
            assert host is not None and not host.array[: 32 * len(set(keys))].any()

        one = os.urandom(32)
        for _ in range(CALLS):
            check([one] * len(sizes))
        captured, launched = graphs.captured, graphs.launched
        other = os.urandom(32)
        check([other] * len(sizes))
        assert (graphs.captured, graphs.launched) == (captured, launched + 1)
        # A key per segment (more key records, read when the graph runs like the one key):
        # launches with fresh keys each time.
        for _ in range(CALLS):
            check([os.urandom(32) for _ in sizes])
        launched = graphs.launched
        check([os.urandom(32) for _ in sizes])
        assert graphs.launched == launched + 1
        # The single-segment keyed digest is a table of one.
        n, p = sizes[-1], payloads[-1]
        for _ in range(CALLS):
            k = os.urandom(32)
            got = cuda_backend.digest(bufs[-1], BLAKE3, n, key=k, priority=priority)
            assert got == hash_units(p, BLAKE3, key=k).digest
    finally:
        for b in bufs:
            b.close()


@pytest.mark.parametrize("priority", ["normal", "low"])
def test_unkeyed_tables_as_graphs_read_the_live_bytes(
    cuda_backend: CudaBackend, priority: Priority, graphs_on: None
) -> None:
    sizes = [0, 1, 1023, 4097, MiB, MiB + 1, 2 * MiB + 1025, 5 * MiB + 12345]
    algs = [SHA256_TREE_V1, BLAKE3] * (len(sizes) // 2)
    bufs = [cuda_backend.allocate(max(1, n)) for n in sizes]
    payloads = [bytearray(random_bytes(n, seed=n + 127)) for n in sizes]
    graphs = _graphs(cuda_backend, priority)
    try:
        for b, p in zip(bufs, payloads, strict=True):
            b.write(0, bytes(p))
        segs = [Segment(b, len(p), a) for b, p, a in zip(bufs, payloads, algs, strict=True)]

        def want() -> list[bytes]:
            return [hash_units(bytes(p), a).digest for p, a in zip(payloads, algs, strict=True)]

        for _ in range(CALLS):
            assert cuda_backend.digest_many(segs, priority=priority) == want()
        payloads[-1][MiB + 7] ^= 0x80
        bufs[-1].write(MiB + 7, bytes([payloads[-1][MiB + 7]]))
        launched = graphs.launched
        assert cuda_backend.digest_many(segs, priority=priority) == want()
        assert graphs.launched == launched + 1
        hashed = cuda_backend.hash_many(segs, priority=priority)
        assert hashed == [hash_units(bytes(p), a) for p, a in zip(payloads, algs, strict=True)]
    finally:
        for b in bufs:
            b.close()


def test_switch_off_launches_no_graph(cuda_backend: CudaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "GRAPHS", False)
    n = 2 * MiB + 1025
    data = random_bytes(n, seed=131)
    graphs = _graphs(cuda_backend)
    buf = cuda_backend.allocate(n)
    try:
        launched, captured = graphs.launched, graphs.captured
        for alg in ALGS:
            want = hash_units(data, alg)
            for _ in range(CALLS):
                assert cuda_backend.write_and_hash(buf, data, alg) == want
                assert cuda_backend.digest(buf, alg) == want.digest
                assert cuda_backend.hash(buf, alg) == want
                assert cuda_backend.digest_many([Segment(buf, n, alg), Segment(buf, 7, alg)]) == [
                    want.digest,
                    hash_units(data[:7], alg).digest,
                ]
        k = bytes(range(32))
        assert cuda_backend.digest(buf, BLAKE3, key=k) == hash_units(data, BLAKE3, key=k).digest
        assert (graphs.launched, graphs.captured) == (launched, captured)
    finally:
        buf.close()


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("alg", ALGS)
def test_one_copy_seals_from_pinned_and_pageable_memory(
    cuda_backend: CudaBackend, alg: str, graphs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seals that go up in one copy on the compute stream (``_seal_one_copy``: up to 1 MiB, or
    pinned up to the staging size) and the staged ones beside them, from a pinned buffer of
    this backend at an offset (found without the driver: ``_is_pinned``'s own-buffer check),
    and from pageable memory: each equal to the host reference, again and again with changing
    bytes (a replayed tail reads the new unit values)."""
    monkeypatch.setattr(_backend, "GRAPHS", graphs)
    sizes = [1, 4097, MiB - 1, MiB, MiB + 1, 2 * MiB + 1025, 64 * MiB, 64 * MiB + 1]
    pinned = cuda_backend.pinned_host_buffer(max(sizes) + 4096)
    buf = cuda_backend.allocate(max(sizes))
    try:
        for n in sizes:
            for i in range(3):
                data = random_bytes(n, seed=n + 7 * i)
                pinned.array[4096 : 4096 + n] = memoryview(data)
                want = hash_units(data, alg)
                assert cuda_backend.write_and_hash(buf, pinned.view[4096 : 4096 + n], alg) == want
                assert cuda_backend.write_and_hash(buf, data, alg) == want
                assert cuda_backend.digest(buf, alg, n) == want.digest
    finally:
        buf.close()
        pinned.close()


def _buffer_sizes(b: CudaBackend) -> tuple[int, int, int]:
    """The compute lane's scratch, pinned result buffer and table arena, in bytes."""
    return (b._scratch_size, b._results.size if b._results else 0, b._lane("normal").arena_size)


@pytest.mark.parametrize(
    ("grown", "call"),
    [
        # A blake3 verify of 4,096 units: 64 bytes of scratch a unit, 32 bytes come back.
        ("scratch", lambda b, big: b.digest(big, BLAKE3)),
        # 2,048 unit digests come back (past the 64 KiB result buffer); less scratch than above.
        ("results", lambda b, big: b.hash(big, SHA256_TREE_V1, 2048 * MiB)),
        # A table of 4,097 units on the normal lane (two rows: a table of one unkeyed row runs
        # on the single-segment path): its arena.
        (
            "arena",
            lambda b, big: b.digest_many([Segment(big, 4096 * MiB, BLAKE3), Segment(big, MiB, BLAKE3)]),
        ),
    ],
)
def test_no_graph_outlives_the_buffers_it_names(
    monkeypatch: pytest.MonkeyPatch, grown: str, call: Callable[[CudaBackend, object], object]
) -> None:
    """A graph names the scratch, the pinned result buffer and a lane's table arena, which grow
    by being freed and allocated again and may come back at the same address (the scratch did,
    on an H200): the grown buffer then matches the keys of graphs captured with the freed one.
    On an H200 (2026-11-30) the first launch of such a stale graph crashed the process (SIGSEGV)
    or failed the context (CUDA_ERROR_LAUNCH_FAILED): a 1 MiB shard verified again after a
    larger shard had grown the scratch. A growth must close the graphs first
    (``GraphCache.invalidate``), and the small shard's calls must still give the host's digests
    through graphs captured anew. A fresh backend: the session's has grown its buffers for other
    tests already. For "results", the scratch is grown first (by the "scratch" call) so that only
    the result buffer grows."""
    from vram_residency.backends.cuda import open_backend

    monkeypatch.setattr(_backend, "GRAPHS", True)
    data = random_bytes(MiB, seed=4242)
    want = hash_units(data, SHA256_TREE_V1)
    with open_backend(0) as b:
        graphs = b._graphs
        small = b.allocate(MiB)
        big = b.allocate(4096 * MiB)  # zeros: only its size matters here
        try:
            small.write(0, data)

            def small_calls() -> None:
                # Enough calls for each key to be captured and launched: verify, hash, a seal's
                # tail, and a table of the shard on the normal lane.
                for _ in range(CALLS):
                    assert b.digest(small, SHA256_TREE_V1) == want.digest
                    assert b.hash(small, SHA256_TREE_V1) == want
                    assert b.write_and_hash(small, data, SHA256_TREE_V1) == want
                    table = [Segment(small, MiB, SHA256_TREE_V1)] * 2  # a table of one is a digest
                    assert b.digest_many(table) == [want.digest] * 2

            if grown == "results":
                b.digest(big, BLAKE3)
            small_calls()
            # Three keys: the verify, the hash (a 1 MiB seal queues the same work), the table.
            assert len(graphs) >= 3 and graphs.launched
            before, invalidated = _buffer_sizes(b), graphs.invalidated
            call(b, big)
            after = _buffer_sizes(b)
            names = ("scratch", "results", "arena")
            assert grown in [n for n, x, y in zip(names, before, after, strict=True) if y > x]
            assert graphs.invalidated > invalidated and len(graphs) == 0
            launched = graphs.launched
            small_calls()  # before the fix: the first stale launch crashed here
            assert graphs.launched > launched and graphs.launch_failed == 0
        finally:
            small.close()
            big.close()
