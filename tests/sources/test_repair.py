"""repair(): only damaged units are re-copied, only from a source that holds the sealed bytes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import InvalidInput, NotSealed, SealVerificationFailed, VramManager, check_seal_record
from vram_residency.formats.tree import UNIT_SIZE
from vram_residency.testing import flip_bit


def test_repair_restores_and_original_seal_verifies(
    mgr: VramManager, st_file: tuple[Path, dict[str, Any]], audit: Any, token: str
) -> None:
    path, _ = st_file
    shard = mgr.seal_file(path)
    record = shard.record()
    n = shard.vram_bytes
    bits = [8 * (UNIT_SIZE + 5), 8 * (3 * UNIT_SIZE + 77) + 6]
    for b in bits:
        flip_bit(mgr, shard, b)
    with pytest.raises(SealVerificationFailed):
        mgr.verify_sealed(shard)
    report = mgr.repair(shard)
    assert report.shard_id == shard.shard_id
    assert report.repaired_ranges == ((UNIT_SIZE, 2 * UNIT_SIZE), (3 * UNIT_SIZE, min(4 * UNIT_SIZE, n)))
    assert report.repaired_units == 2
    assert report.repaired_bytes == sum(e - s for s, e in report.repaired_ranges)
    mgr.verify_sealed(shard)  # the very same SealedShard, i.e. the original seal
    assert shard.record() == record
    check_seal_record(record, token)
    (event,) = audit.of("ShardRepaired")
    assert event["shard_id"] == shard.shard_id
    assert event["repaired_ranges"] == [list(r) for r in report.repaired_ranges]
    assert event["source"] == str(path.resolve())


def test_intact_shard_needs_no_repair(
    mgr: VramManager, st_file: tuple[Path, dict[str, Any]], audit: Any
) -> None:
    shard = mgr.seal_file(st_file[0])
    report = mgr.repair(shard)
    assert report.repaired_ranges == () and report.repaired_bytes == 0
    assert audit.of("ShardRepaired") == []


def test_wrong_source_writes_nothing(mgr: VramManager, tmp_path: Path) -> None:
    data = os.urandom(4 * UNIT_SIZE)
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    shard = mgr.seal_file(p)
    flip_bit(mgr, shard, 8 * (2 * UNIT_SIZE + 9))
    damaged = mgr._entry(shard).buf.read(0, shard.vram_bytes)
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(len(data)))
    with pytest.raises(InvalidInput, match="does not hold the sealed bytes"):
        mgr.repair(shard, other)
    assert mgr._entry(shard).buf.read(0, shard.vram_bytes) == damaged
    short = tmp_path / "short.bin"
    short.write_bytes(data[:100])
    with pytest.raises(InvalidInput, match="fewer than"):
        mgr.repair(shard, short)
    with pytest.raises(InvalidInput, match="holds"):
        mgr.repair(shard, data[:-1])
    with pytest.raises(InvalidInput, match="no such file"):
        mgr.repair(shard, tmp_path / "missing")
    # A source that differs only where the device is intact still repairs: only damaged
    # units are read, and each is checked against its own sealed digest.
    patched = bytearray(data)
    patched[0] ^= 0xFF
    mgr.repair(shard, bytes(patched))
    mgr.verify_sealed(shard)


def test_repair_after_the_file_changed_on_disk(mgr: VramManager, tmp_path: Path) -> None:
    p = tmp_path / "w.bin"
    data = os.urandom(2 * UNIT_SIZE)
    p.write_bytes(data)
    shard = mgr.seal_file(p)
    flip_bit(mgr, shard, 8)
    p.write_bytes(os.urandom(len(data)))  # the recorded source no longer holds the sealed bytes
    with pytest.raises(InvalidInput, match="does not hold the sealed bytes"):
        mgr.repair(shard)
    mgr.repair(shard, data)
    mgr.verify_sealed(shard)


def test_a_bad_source_is_refused_even_when_nothing_is_damaged(mgr: VramManager) -> None:
    """A source that could never repair the shard (not a path or bytes, the wrong length, not
    contiguous) is refused whether or not the shard is damaged: it was accepted, reporting
    nothing to repair, as long as the shard was intact, and refused only once it was not."""
    import numpy as np

    data = os.urandom(UNIT_SIZE + 3)
    shard = mgr.seal_model(data)
    for bad in (12, b"short", np.zeros((64, 64))[:, ::2]):
        with pytest.raises(InvalidInput):
            mgr.repair(shard, bad)  # type: ignore[arg-type]
    assert mgr.repair(shard, data).repaired_units == 0


def test_memory_sealed_shards_need_an_explicit_source(mgr: VramManager) -> None:
    data = os.urandom(UNIT_SIZE + 3)
    shard = mgr.seal_model(data)
    flip_bit(mgr, shard, 8 * UNIT_SIZE)
    with pytest.raises(InvalidInput, match="no recorded source"):
        mgr.repair(shard)
    with pytest.raises(InvalidInput, match="path or a contiguous bytes-like"):
        mgr.repair(shard, 12)  # type: ignore[arg-type]
    report = mgr.repair(shard, memoryview(data))
    assert report.repaired_ranges == ((UNIT_SIZE, UNIT_SIZE + 3),)
    mgr.verify_sealed(shard)


def test_edited_seal_cannot_be_repaired(mgr: VramManager, st_file: tuple[Path, dict[str, Any]]) -> None:
    shard = mgr.seal_file(st_file[0])
    forged = dataclasses.replace(shard, digest="0" * 64, _signature=shard._signature)
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.repair(forged)
    assert exc.value.tag_valid is False
    mgr.deallocate(shard)
    with pytest.raises(NotSealed):
        mgr.repair(shard)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_set_of_flips_is_repaired(mgr: VramManager, tmp_path: Path, data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 5 * UNIT_SIZE + 1000), label="size")
    algorithm = data.draw(st.sampled_from(["sha256-tree-v1", "blake3"]), label="algorithm")
    blob = os.urandom(size)
    p = tmp_path / "h.bin"
    p.write_bytes(blob)
    shard = mgr.seal_file(p, digest_algorithm=algorithm)
    try:
        flips = data.draw(st.lists(st.integers(0, 8 * size - 1), min_size=1, max_size=6), label="bits")
        for b in flips:
            flip_bit(mgr, shard, b)
        report = mgr.repair(shard)
        mgr.verify_sealed(shard)
        assert mgr._entry(shard).buf.read(0, size) == blob
        # Flips that cancel out leave nothing to repair; otherwise only the touched units are.
        touched = {b // 8 // UNIT_SIZE for b in flips}
        assert {s // UNIT_SIZE for s, e in report.repaired_ranges} <= touched
    finally:
        mgr.deallocate(shard)
