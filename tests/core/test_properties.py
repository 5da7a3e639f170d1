"""Properties (hypothesis): any single-bit flip is detected and located; any change to a public
field fails verification; seal records round-trip; streaming equals one-shot hashing."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import NotSealed, SealedShard, SealVerificationFailed, VramManager
from vram_residency.formats.stream import StreamHasher
from vram_residency.formats.tree import ALGORITHMS, UNIT_SIZE, hash_units
from vram_residency.testing import flip_bit

TOKEN = "property-token-0123456789abcdef"
SIZE = 3 * UNIT_SIZE + 4099

_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def sealed() -> Iterator[tuple[VramManager, dict[str, SealedShard]]]:
    with VramManager(TOKEN, backend="host", capacity_bytes=64 << 20) as m:
        data = os.urandom(SIZE)
        yield m, {alg: m.seal_model(data, model_ref="p", digest_algorithm=alg) for alg in ALGORITHMS}


@_SETTINGS
@given(bit=st.integers(0, 8 * SIZE - 1), alg=st.sampled_from(ALGORITHMS))
def test_any_single_bit_flip_is_detected_and_located(
    sealed: tuple[VramManager, dict[str, SealedShard]], bit: int, alg: str
) -> None:
    mgr, shards = sealed
    shard = shards[alg]
    flip_bit(mgr, shard, bit)
    try:
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_sealed(shard)
        (start, end), *rest = info.value.corrupted_ranges
        assert not rest
        assert start <= bit // 8 < end
        assert end - start <= UNIT_SIZE
    finally:
        flip_bit(mgr, shard, bit)
    mgr.verify_sealed(shard)


_FIELD_CHANGES = {
    "shard_id": st.just("shard-" + "0" * 32),
    "gpu_device": st.integers(1, 2**32 - 1),
    "vram_bytes": st.integers(0, 2**64 - 1),
    "digest": st.binary(min_size=32, max_size=32).map(bytes.hex),
    "digest_algorithm": st.sampled_from(ALGORITHMS),
    "sealed_at_ns": st.integers(0, 2**64 - 1),
    "worker_id": st.text(max_size=20),
    "model_ref": st.one_of(st.none(), st.text(min_size=1, max_size=20)),
    "shard_index": st.integers(0, 10),
    "total_shards": st.integers(11, 20),
}


@_SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(_FIELD_CHANGES)))
def test_changing_any_public_field_fails(
    sealed: tuple[VramManager, dict[str, SealedShard]], data: st.DataObject, name: str
) -> None:
    mgr, shards = sealed
    shard = shards["sha256-tree-v1"]
    value = data.draw(_FIELD_CHANGES[name])
    if getattr(shard, name) == value:
        return
    # Any: each field's strategy draws that field's type, which the lookup by name cannot show.
    change: dict[str, Any] = {name: value}
    forged = dataclasses.replace(shard, **change)
    # A changed shard_id names no shard of this manager; every other change breaks the tag.
    expected = NotSealed if name == "shard_id" else SealVerificationFailed
    with pytest.raises(expected):
        mgr.verify_sealed(forged)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 3 * UNIT_SIZE),
    cuts=st.lists(st.integers(0, 3 * UNIT_SIZE), max_size=6),
    alg=st.sampled_from(ALGORITHMS),
)
def test_stream_equals_one_shot(n: int, cuts: list[int], alg: str) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    points = sorted({0, n, *(c for c in cuts if c <= n)})
    h = StreamHasher(alg)
    for a, b in itertools.pairwise(points):
        h.update(data[a:b])
    assert h.finalize() == hash_units(data, alg)
