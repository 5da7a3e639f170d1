"""The CUDA backend's prepared segment tables (``CudaBackend._prepared_table``), without a GPU.

A store verifies a model by presenting the same list of Segment objects again and again; the
backend keeps what it checked and gathered for them (columns, buffers in lock order, the plan
key) and reuses it only for the very same objects in the same order. Whatever sequence of tables
comes, what a call gets must equal what checking that table from scratch gives; tables with keys
are never kept. The backend is made without its constructor (which needs a device): the method
only reads its buffers' addresses and sizes; nothing is launched or dereferenced."""

from __future__ import annotations

import threading
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.base import Segment
from vram_residency.backends.cuda._backend import _PLAN_CACHE, CudaBackend, CudaBuffer
from vram_residency.errors import InvalidInput
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1

MiB = 1 << 20


def _backend() -> CudaBackend:
    b = CudaBackend.__new__(CudaBackend)
    b.device = 0
    b._prepared = OrderedDict()
    b._prepared_lock = threading.Lock()
    return b


def _buffers(b: CudaBackend, count: int) -> list[CudaBuffer]:
    return [CudaBuffer(b, (1 << 40) + i * (64 * MiB), 32 * MiB, 32 * MiB, owned=False) for i in range(count)]


def _fresh(b: CudaBackend, segments: list[Segment]) -> tuple[object, ...]:
    cols = b._table_columns(segments)
    return (cols.ptrs, cols.lens, cols.algs, cols.keys, sorted(set(cols.bufs), key=id))


def _got(b: CudaBackend, segments: list[Segment]) -> tuple[object, ...]:
    p = b._prepared_table(segments)
    return (p.cols.ptrs, p.cols.lens, p.cols.algs, p.cols.keys, p.bufs)


def test_the_same_segment_objects_reuse_the_checked_table() -> None:
    b = _backend()
    segs = [Segment(buf, MiB + i, BLAKE3) for i, buf in enumerate(_buffers(b, 149))]
    first = b._prepared_table(segs)
    assert b._prepared_table(list(segs)) is first  # another list, the same objects
    assert first.plan_key == (
        tuple(first.cols.ptrs),
        tuple(first.cols.lens),
        tuple(first.cols.algs),
        (None,) * 149,
    )
    assert _got(b, segs) == _fresh(b, segs)


def test_an_equal_but_new_segment_or_another_order_is_checked_again() -> None:
    b = _backend()
    bufs = _buffers(b, 5)
    segs = [Segment(buf, MiB, SHA256_TREE_V1) for buf in bufs]
    first = b._prepared_table(segs)
    middle = [*segs[:2], Segment(bufs[2], MiB, SHA256_TREE_V1), *segs[3:]]  # equal, not identical
    assert b._prepared_table(middle) is not first
    swapped = [segs[0], segs[2], segs[1], segs[3], segs[4]]  # same ends, other order
    again = b._prepared_table(swapped)
    assert again is not first and _got(b, swapped) == _fresh(b, swapped)


def test_keyed_tables_are_never_kept() -> None:
    b = _backend()
    segs = [Segment(buf, MiB, BLAKE3, bytes(range(32))) for buf in _buffers(b, 3)]
    p = b._prepared_table(segs)
    assert p.plan_key is None and not b._prepared
    assert b._prepared_table(segs) is not p


def test_a_bad_entry_is_refused_every_time() -> None:
    b = _backend()
    bufs = _buffers(b, 2)
    bad = [Segment(bufs[0], MiB, BLAKE3), Segment(bufs[1], 64 * MiB, BLAKE3)]  # past the buffer
    for _ in range(2):
        with pytest.raises(InvalidInput):
            b._prepared_table(bad)
    assert not b._prepared


def test_the_cache_is_bounded() -> None:
    b = _backend()
    bufs = _buffers(b, 4)
    for i in range(3 * _PLAN_CACHE):
        b._prepared_table([Segment(bufs[i % 4], i + 1, BLAKE3), Segment(bufs[(i + 1) % 4], 7, BLAKE3)])
    assert len(b._prepared) == _PLAN_CACHE


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=6), min_size=1, max_size=12))
def test_any_sequence_of_tables_gets_what_checking_from_scratch_gives(calls: list[list[int]]) -> None:
    # Ten segments over four buffers (two algorithms, repeated buffers); each call presents some
    # of them in some order, sometimes as the very list of an earlier call.
    b = _backend()
    bufs = _buffers(b, 4)
    pool = [Segment(bufs[i % 4], (i + 1) * 4099, BLAKE3 if i % 3 else SHA256_TREE_V1) for i in range(10)]
    tables = [[pool[i] for i in call] for call in calls]
    for table in tables + tables[::-1]:
        assert _got(b, table) == _fresh(b, table)
