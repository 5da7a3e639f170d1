"""VramManager end to end on real VRAM: what the host-backend tests check, on the CUDA backend."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import (
    InsufficientVram,
    InvalidInput,
    NotSealed,
    SealedShard,
    SealVerificationFailed,
    VramManager,
    check_seal_record,
)
from vram_residency.formats import digest
from vram_residency.formats.tree import ALGORITHMS, UNIT_SIZE
from vram_residency.testing import flip_bit

pytestmark = pytest.mark.gpu

TOKEN = "gpu-manager-token-0123456789abcdef"


@pytest.fixture(scope="module")
def mgr() -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="cuda", worker_id="gpu-w") as m:
        yield m


def test_backend_is_cuda(mgr: VramManager) -> None:
    assert mgr.backend == "cuda"
    assert "EMULATION" not in mgr.backend_description


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", [1, 4095, 4097, UNIT_SIZE, 5 * UNIT_SIZE + 17])
def test_seal_verify_matches_host(mgr: VramManager, algorithm: str, n: int) -> None:
    data = os.urandom(n)
    shard = mgr.seal_model(
        data, model_ref="m", digest_algorithm=algorithm, expected_digest=digest(data, algorithm).hex()
    )
    try:
        mgr.verify_sealed(shard)
        assert check_seal_record(shard.record(), TOKEN) == shard
    finally:
        mgr.deallocate(shard)


_SIZE = 6 * UNIT_SIZE + 123


@pytest.fixture(scope="module")
def sealed(mgr: VramManager) -> Iterator[dict[str, SealedShard]]:
    data = os.urandom(_SIZE)
    shards = {a: mgr.seal_model(data, digest_algorithm=a) for a in ALGORITHMS}
    yield shards
    for s in shards.values():
        mgr.deallocate(s)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bit=st.integers(0, 8 * _SIZE - 1), alg=st.sampled_from(ALGORITHMS))
def test_any_bit_flip_in_vram_is_detected_and_located(
    mgr: VramManager, sealed: dict[str, SealedShard], bit: int, alg: str
) -> None:
    shard = sealed[alg]
    flip_bit(mgr, shard, bit)
    try:
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_sealed(shard)
        assert len(info.value.corrupted_ranges) == 1
        start, end = info.value.corrupted_ranges[0]
        assert start <= bit // 8 < end
    finally:
        flip_bit(mgr, shard, bit)
    mgr.verify_sealed(shard)


def test_tampered_fields_fail(mgr: VramManager, sealed: dict[str, SealedShard]) -> None:
    shard = sealed["sha256-tree-v1"]
    for change in ({"vram_bytes": 1}, {"model_ref": "x"}, {"gpu_device": 1}, {"worker_id": "evil"}):
        with pytest.raises(SealVerificationFailed):
            mgr.verify_sealed(dataclasses.replace(shard, **change))


def test_expected_digest_mismatch_leaves_nothing(mgr: VramManager) -> None:
    free = mgr.available_vram()
    with pytest.raises(InvalidInput):
        mgr.seal_model(os.urandom(UNIT_SIZE), expected_digest="0" * 64)
    # Other processes may allocate meanwhile; ours must not have kept 1 MiB.
    assert mgr.available_vram() >= free - (2 << 20) or mgr.shards() == []
    assert all(s.vram_bytes != UNIT_SIZE for s in mgr.shards())


def test_out_of_memory_is_clean_and_retriable(mgr: VramManager) -> None:
    before = len(mgr.shards())
    big = mgr.total_vram() + (1 << 30)
    with VramManager(TOKEN, backend="cuda", max_model_bytes=2 * big) as m2:
        free = m2.available_vram()
        with pytest.raises(InsufficientVram) as info:
            m2._seal_into(big, lambda buf: None)
        assert info.value.retriable
        assert abs(m2.available_vram() - free) < (64 << 20)
    assert len(mgr.shards()) == before


def test_ten_thousand_seal_deallocate_cycles_leak_nothing(mgr: VramManager) -> None:
    data = os.urandom(64 << 10)
    warm = mgr.seal_model(data)
    mgr.deallocate(warm)
    free = mgr.available_vram()
    for _ in range(10_000):
        mgr.deallocate(mgr.seal_model(data))
    assert mgr.available_vram() == free


def test_concurrent_threads(mgr: VramManager) -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(30):
                s = mgr.seal_model(os.urandom(1 + (seed * 7919 + i * 104729) % (3 * UNIT_SIZE)))
                mgr.verify_sealed(s)
                mgr.deallocate(s)
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def test_deallocated_shard_is_gone(mgr: VramManager) -> None:
    s = mgr.seal_model(b"abc" * 1000)
    mgr.deallocate(s)
    with pytest.raises(NotSealed):
        mgr.verify_sealed(s)
