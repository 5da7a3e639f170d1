"""The keys under which repeated sha256-tree-v1 and blake3 digests are kept as CUDA graphs
(``_backend.digest_graph_key``, ``_batch.Plan.signature``), without a GPU: each thing the queued
work depends on changes the key, nothing else does (a table's key bytes, which the graph reads
from the pinned buffer when it runs), no key material is in a key, and the key records a run
zeroes are exactly the keys. The GPU side (the graphs themselves) is tests/gpu/test_cuda_gpu_graphs.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from vram_residency.backends.cuda import _backend, _batch
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE

_BASE: dict[str, Any] = {
    "algorithm": SHA256_TREE_V1,
    "ptr": 0x7F0000200000,
    "n": 3 * UNIT_SIZE + 4097,
    "want_units": False,
    "split": True,
    "b3_split": False,
    "units_kernel": "sha256_tree_units_split",
    "scratch": 0x7F0010000000,
    "result": 0x7F2000000000,
}
_CHANGED: dict[str, Any] = {
    "algorithm": BLAKE3,
    "ptr": 0x7F0000200100,
    "n": 3 * UNIT_SIZE + 4096,
    "want_units": True,
    "split": False,
    "b3_split": True,
    "units_kernel": "sha256_tree_units_occ4",
    "scratch": 0x7F0010001000,
    "result": 0x7F2000010000,
}


def _key(**kw: Any) -> tuple[object, ...]:
    args = {**_BASE, **kw}
    tail_only = bool(args.pop("tail_only", False))
    return _backend.digest_graph_key(*args.values(), tail_only=tail_only)


def test_the_switch_is_on_by_default_and_a_plain_bool() -> None:
    # Benchmarks and tests flip it (bench/gpu_bench.py --graphs, monkeypatch): a module bool.
    assert _backend.GRAPHS is True
    assert "GRAPHS" not in getattr(_backend, "__final__", ())


def test_same_inputs_same_key_and_the_key_is_hashable() -> None:
    assert _key() == _key()
    assert hash(_key()) == hash(_key())


@pytest.mark.parametrize("field", sorted(_CHANGED))
def test_every_input_changes_the_key(field: str) -> None:
    assert _key(**{field: _CHANGED[field]}) != _key()


def test_the_seal_tail_and_the_whole_digest_never_share_a_graph() -> None:
    assert _key(tail_only=True) != _key()
    assert _key(tail_only=True)[0] == "seal-tail" and _key()[0] == "digest"


def test_keys_do_not_meet_the_nh_fast_tables_keys() -> None:
    # _nh_fast._queue_and_wait's keys start with a tuple of rows; these with a str tag.
    assert isinstance(_key()[0], str)


def _plan(keys: Sequence[bytes | None], lens: Sequence[int] | None = None) -> _batch.Plan:
    lens = lens or [0, 1, 1025, UNIT_SIZE + 1, 300 * UNIT_SIZE + 7]
    segs = [
        (0x7F0000000000 + (i << 32), n, BLAKE3, k) for i, (n, k) in enumerate(zip(lens, keys, strict=True))
    ]
    return _batch.build_plan(segs, False, lambda _n: 0x7F00F0000000)


def test_a_tables_signature_is_its_launches_not_its_key_bytes_or_lengths() -> None:
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    same = _plan([k1] * 5)
    assert same.signature() == _plan([k2] * 5).signature()  # a new key, the same graph
    # Key records are padded to the table's alignment: a second key moves nothing, so the same
    # graph serves (the records are uploaded by its first copy when it runs) ...
    two = _plan([k1, k2, k1, k2, k1])
    assert two.signature() == same.signature() and two.key_bytes == 64
    # ... while nine keys (288 bytes) move the descriptors: another graph.
    keys = [bytes([i]) * 32 for i in range(9)]
    lens = [1 + i for i in range(9)]
    assert _plan(keys, lens).signature() != _plan([k1] * 9, lens).signature()
    assert _plan(keys, lens).signature() == _plan(keys[::-1], lens).signature()
    assert _plan([None] * 5).signature() != same.signature()
    # Lengths are descriptor fields too: the same unit counts, the same graph; another count of
    # units changes the launches' grids.
    assert _plan([k1] * 5, [0, 1, 1025, UNIT_SIZE + 2, 300 * UNIT_SIZE + 8]).signature() == same.signature()
    assert _plan([k1] * 5, [0, 1, 1025, UNIT_SIZE + 1, 301 * UNIT_SIZE + 8]).signature() != same.signature()
    assert k1 not in repr(same.signature()).encode() and repr(k1) not in repr(same.signature())


def test_key_bytes_are_exactly_the_leading_key_records() -> None:
    k1, k2 = bytes(range(32)), bytes(range(100, 132))
    plan = _plan([k1, None, k2, k1, None])
    assert plan.key_bytes == 64
    assert plan.upload[:64].tobytes() == k1 + k2
    unkeyed = _plan([None] * 5)
    assert unkeyed.key_bytes == 0
    # Everything after the key records (the descriptors) is the same for other keys in the same
    # places: the records are all the key material, and zeroing them touches no descriptor.
    other = _plan([k2, None, k1, k2, None])
    assert other.upload[64:].tobytes() == plan.upload[64:].tobytes()
    assert other.signature() == plan.signature()
