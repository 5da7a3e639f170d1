"""The segment-table checks of the CUDA backend (``CudaBackend._table_columns``), without a GPU.

``_table_columns`` accepts the common entry inline and sends every other one to
``_check_segment``; both only compare the buffer's backend by identity and read the buffer's
address and size, so a plain object stands in for the backend and the CudaBuffers wrap made-up
addresses that nothing dereferences. What is checked: for every kind of entry, good or bad, the
columns (or the error, type and message) are exactly what ``_check_segment`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vram_residency.backends.base import Segment
from vram_residency.backends.cuda._backend import CudaBackend, CudaBuffer
from vram_residency.errors import VramError
from vram_residency.formats.tree import BLAKE3, NH_FAST_V1, SHA256_TREE_V1


class _BackendStandIn:
    """Only what CudaBuffer's constructor reads (``device``) and the two checking methods under
    test, the backend's own; compared by identity."""

    device = 0
    _check_segment = CudaBackend._check_segment
    _table_columns = CudaBackend._table_columns


@dataclass(frozen=True, slots=True)
class _SegmentSubclass(Segment):
    pass


def _entries(owner: Any, other: Any) -> list[object]:
    buf = CudaBuffer(owner, 0x7F00_0000_0000, 4096, 4096, owned=False)
    foreign = CudaBuffer(other, 0x7F10_0000_0000, 4096, 4096, owned=False)
    return [
        Segment(buf, 4096, SHA256_TREE_V1),
        Segment(buf, 0, BLAKE3),
        Segment(buf, 17, BLAKE3, bytes(range(32))),
        _SegmentSubclass(buf, 10, SHA256_TREE_V1),
        Segment(buf, 4097, SHA256_TREE_V1),
        Segment(buf, -1, SHA256_TREE_V1),
        Segment(buf, True, SHA256_TREE_V1),
        Segment(buf, 10.0, SHA256_TREE_V1),  # type: ignore[arg-type]
        Segment(buf, 10, SHA256_TREE_V1, bytes(32)),
        Segment(buf, 10, BLAKE3, b"short"),
        Segment(buf, 10, "md5"),
        Segment(buf, 10, NH_FAST_V1, bytes(32)),
        Segment(foreign, 10, SHA256_TREE_V1),
        Segment(object(), 10, SHA256_TREE_V1),  # type: ignore[arg-type]
        (buf, 10, SHA256_TREE_V1, None),
    ]


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except VramError as exc:
        return type(exc).__name__, str(exc)


def test_table_columns_accept_and_refuse_exactly_as_check_segment() -> None:
    owner: Any = _BackendStandIn()
    other: Any = _BackendStandIn()
    entries = _entries(owner, other)
    refused = 0
    for seg in entries:
        want = _outcome(lambda seg=seg: owner._check_segment(seg))
        got = _outcome(lambda seg=seg: owner._table_columns([seg]))
        if want[0] != "ok":
            refused += 1
            assert got == want, seg
            continue
        buf, n, alg, key = want[1]
        cols = got[1]
        assert got[0] == "ok"
        assert (cols.bufs, cols.ptrs, cols.lens, cols.algs, cols.keys) == (
            [buf],
            [buf._ptr],
            [n],
            [alg],
            [key],
        )
    assert refused >= 9  # the bad entries above are refused, not waved through


def test_first_bad_entry_of_a_long_table_is_the_error() -> None:
    owner: Any = _BackendStandIn()
    bufs = [
        CudaBuffer(owner, 0x7F00_0000_0000 + (i << 20), 1 << 20, 1 << 20, owned=False) for i in range(1000)
    ]
    table = [Segment(b, 1 << 20, SHA256_TREE_V1) for b in bufs]
    cols = owner._table_columns(table)
    assert cols.ptrs == [b._ptr for b in bufs] and cols.lens == [1 << 20] * 1000
    table[700] = Segment(bufs[700], (1 << 20) + 1, SHA256_TREE_V1)
    table[900] = Segment(bufs[900], 10, "md5")
    want = _outcome(lambda: owner._check_segment(table[700]))
    assert want[0] != "ok"
    assert _outcome(lambda: owner._table_columns(table)) == want  # entry 700, not 900
