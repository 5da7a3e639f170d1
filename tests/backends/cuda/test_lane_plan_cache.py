"""The lane's plan cache (``_Lane.plan``), without a GPU: its key leaves the keys' bytes
out and a hit writes the call's keys into the reused plan's upload image. Whatever the table
(algorithms mixed, keys repeated, shared or absent in any pattern), the plan a call gets must
upload exactly the bytes a plan built from scratch for that call would, and a plan reused with
other keys must never carry another call's key.

``_Lane.plan`` only reads the lane's arena (address and size) and its plan dictionary: the lane
is made without its constructor (which needs a device), with an arena already large enough that
``arena()`` never allocates; nothing is launched or dereferenced."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.cuda import _batch
from vram_residency.backends.cuda._backend import _PLAN_CACHE, TableColumns, _Lane
from vram_residency.errors import CudaAllocationFailed
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1

MiB = 1 << 20
BASE = 1 << 40


def _lane() -> _Lane:
    lane = _Lane.__new__(_Lane)
    lane._plans = OrderedDict()
    lane.arena_ptr, lane.arena_size = BASE, 1 << 40
    return lane


def _pick(spec: _batch.TableAlgorithm, units: int) -> str:
    return spec.units_kernel


def _columns(table: list[tuple[int, str, bytes | None]]) -> TableColumns:
    ptrs = [(1 << 32) + i * (512 << 20) for i in range(len(table))]
    return TableColumns(
        [None] * len(table),  # type: ignore[list-item]  # bufs: not read by plan()
        ptrs,
        [n for n, _, _ in table],
        [a for _, a, _ in table],
        [k for _, _, k in table],
    )


def _fresh(cols: TableColumns, want_units: bool) -> _batch.Plan:
    return _batch.build_plan_columns(
        cols.ptrs, cols.lens, cols.algs, cols.keys, want_units, lambda n: BASE, _pick
    )


# Per segment: a length, then None (sha256-tree-v1), "u" (blake3 unkeyed) or a key slot 0..3.
_ENTRY = st.tuples(
    st.sampled_from([0, 1, 4096, MiB, MiB + 1, 3 * MiB + 5, 300 * MiB]),
    st.one_of(st.none(), st.just("u"), st.integers(0, 3)),
)


def _table(entries: list[tuple[int, object]], pool: list[bytes]) -> list[tuple[int, str, bytes | None]]:
    out: list[tuple[int, str, bytes | None]] = []
    for n, what in entries:
        if what is None:
            out.append((n, SHA256_TREE_V1, None))
        elif what == "u":
            out.append((n, BLAKE3, None))
        else:
            assert isinstance(what, int)
            out.append((n, BLAKE3, pool[what]))
    return out


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(_ENTRY, min_size=1, max_size=12),
    want_units=st.booleans(),
    seeds=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3),
)
def test_a_reused_plan_uploads_exactly_what_a_fresh_one_would(
    entries: list[tuple[int, object]], want_units: bool, seeds: list[int]
) -> None:
    lane = _lane()
    first: _batch.Plan | None = None
    for seed in seeds:
        pool = [np.random.default_rng([seed, j]).bytes(32) for j in range(4)]
        cols = _columns(_table(entries, pool))
        plan = lane.plan(cols, want_units, _pick)
        fresh = _fresh(cols, want_units)
        assert plan.upload.tobytes() == fresh.upload.tobytes()
        assert plan.download_offset == fresh.download_offset
        assert plan.download_bytes == fresh.download_bytes
        assert plan.arena_bytes == fresh.arena_bytes
        if first is None:
            first = plan
        else:
            assert plan is first  # same shape: the cached plan, with this call's keys
    # The keys of the last call only: none of an earlier call's keys is left in the image.
    assert first is not None


def test_key_patterns_that_differ_only_in_which_segments_share_a_key_are_not_confused() -> None:
    # Two tables with the same pointers, lengths, algorithms and the same two keys, but shared
    # differently between segments: their key shapes differ, so neither reuses the other's plan.
    lane = _lane()
    k1, k2 = b"\x11" * 32, b"\x22" * 32
    tables: list[list[tuple[int, str, bytes | None]]] = [
        [(MiB, BLAKE3, k1), (MiB, BLAKE3, k1), (MiB, BLAKE3, k2)],
        [(MiB, BLAKE3, k1), (MiB, BLAKE3, k2), (MiB, BLAKE3, k2)],
        [(MiB, BLAKE3, k2), (MiB, BLAKE3, k1), (MiB, BLAKE3, k1)],
        [(MiB, BLAKE3, k1), (MiB, BLAKE3, None), (MiB, BLAKE3, k2)],
        [(MiB, BLAKE3, None), (MiB, BLAKE3, None), (MiB, BLAKE3, None)],
    ]
    for _ in range(2):
        for t in tables:
            cols = _columns(t)
            assert lane.plan(cols, False, _pick).upload.tobytes() == _fresh(cols, False).upload.tobytes()


def test_the_plan_cache_is_bounded_and_a_moved_arena_replans() -> None:
    lane = _lane()
    for i in range(3 * _PLAN_CACHE):
        lane.plan(_columns([(i + 1, SHA256_TREE_V1, None)]), False, _pick)
    assert len(lane._plans) == _PLAN_CACHE
    cols = _columns([(MiB + 3, BLAKE3, b"\x33" * 32)])
    before = lane.plan(cols, True, _pick)
    lane.arena_ptr = BASE + (1 << 30)  # the arena was reallocated elsewhere
    after = lane.plan(cols, True, _pick)
    assert after is not before
    rows = after.upload[after.unit_launches[0].table :].view(np.uint8)
    assert int.from_bytes(rows[48 * 0 + 40 : 48 * 0 + 48].tobytes(), "little") == BASE + (1 << 30)


def test_table_columns_never_show_their_keys() -> None:
    key = bytes(range(7, 39))
    cols = _columns([(MiB, BLAKE3, key), (4096, SHA256_TREE_V1, None)])
    assert repr(key) not in repr(cols) and key.hex() not in repr(cols)


def test_a_run_that_fails_before_queuing_leaves_no_key_in_the_plan_image() -> None:
    """``_Lane.run`` zeroed the key records of a keyed table only from inside its try block: a
    run that failed before it (the pinned buffer could not be grown: cuMemHostAlloc out of
    memory) left the call's keys in the cached plan's upload image, where they stayed until
    the plan was evicted or reused. ``_pinned`` is replaced by a test double that raises as a
    failed pinned allocation does; nothing reaches the device (no lane stream, no backend)."""
    lane = _lane()
    key = bytes(range(100, 132))
    plan = lane.plan(_columns([(MiB + 1, BLAKE3, key), (4096, SHA256_TREE_V1, None)]), False, _pick)
    assert plan.key_bytes == 32 and plan.upload[:32].tobytes() == key

    def no_pinned_memory(nbytes: int) -> object:  # test double of a failed cuMemHostAlloc
        raise CudaAllocationFailed("allocating pinned host memory: CUDA_ERROR_OUT_OF_MEMORY")

    lane._pinned = no_pinned_memory  # type: ignore[assignment,method-assign]
    lane.b = None  # type: ignore[assignment]  # no backend: the run must fail before using it
    with pytest.raises(CudaAllocationFailed):
        lane.run(plan, {})
    assert not plan.upload[: plan.key_bytes].any()
