"""Verify plans (issue 11): a batch of the same shard objects verified again reuses its lookups,
lock order, segment table and expected digests, and skips recomputing tags it checked already.

Every test here verifies a batch once (the plan is made), then changes something (device memory,
a shard object, the model, the store's shards) and checks that the next verify finds exactly
what a verify from scratch finds."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from vram_residency import NotSealed, SealedModel, SealVerificationFailed, VramManager
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1
from vram_residency.testing import flip_bit

TOKEN = "verify-plan-token-0123456789abcdef"
CAP = 64 << 20


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail_on: str | None = None

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        if event_type == self.fail_on:
            raise OSError(28, "No space left on device")
        self.events.append((event_type, fields))


def _model(mgr: VramManager, n: int = 12, alg: str = SHA256_TREE_V1) -> SealedModel:
    return mgr.seal_tensors(
        {f"layer{i}.weight": np.arange(300 + 7 * i, dtype=np.uint16) for i in range(n)},
        digest_algorithm=alg,
    )


def _without_duration(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(e, {k: v for k, v in f.items() if k != "duration_ns"}) for e, f in events]


@pytest.mark.parametrize("alg", [SHA256_TREE_V1, BLAKE3])
def test_repeated_verify_audits_the_same_events_and_finds_a_later_flip(alg: str) -> None:
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        model = _model(mgr, alg=alg)
        audit.events.clear()
        mgr.verify_model(model)  # from scratch: the plan is made
        first = list(audit.events)
        assert [e for e, _ in first] == ["SealVerified"] * 12
        assert [f["shard_id"] for _, f in first] == [s.shard_id for s in model.shards]
        audit.events.clear()
        mgr.verify_model(model)  # planned
        assert _without_duration(audit.events) == _without_duration(first)
        before = mgr.last_verified_ns()
        mgr.verify_model(model)
        after = mgr.last_verified_ns()
        assert all(after[s.shard_id] >= before[s.shard_id] for s in model.shards)

        victim = model.shard("layer5.weight")
        flip_bit(mgr, victim, 8 * 40 + 1)
        audit.events.clear()
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_model(model)
        err = info.value
        assert err.shard_ids == [victim.shard_id]
        assert err.corrupted_ranges == [(0, victim.vram_bytes)]
        assert list(err.corrupted_tensors) == ["layer5.weight"]
        assert err.failures[0].tag_valid
        failed = [f for e, f in audit.events if e == "SealVerificationFailed"]
        assert [f["shard_id"] for f in failed] == [victim.shard_id]
        assert [e for e, _ in audit.events].count("SealVerified") == 11
        assert mgr.last_verified_ns()[victim.shard_id] <= after[victim.shard_id]
        flip_bit(mgr, victim, 8 * 40 + 1)  # flipped back: the same batch verifies again
        mgr.verify_model(model)


def test_a_changed_copy_is_fully_checked() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = list(_model(mgr).shards)
        mgr.verify_many(shards)
        mgr.verify_many(shards)
        # A copy with a changed field (a new object: no plan applies to the batch holding it).
        forged = dataclasses.replace(shards[3], sealed_at_ns=shards[3].sealed_at_ns + 1)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many([*shards[:3], forged, *shards[4:]])
        assert info.value.shard_ids == [forged.shard_id] and not info.value.tag_valid
        # An exact copy (equal fields and tag) is a different object, checked in full, and valid.
        mgr.verify_many([*shards[:3], dataclasses.replace(shards[3]), *shards[4:]])
        mgr.verify_many(shards)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("digest", "0" * 64),
        ("vram_bytes", 2),
        ("sealed_at_ns", 1),
        ("worker_id", "someone-else"),
        ("_signature", b"\0" * 32),
    ],
)
def test_a_shard_edited_in_place_after_a_planned_verify_fails_its_tag(field: str, value: object) -> None:
    # The store's own shard object, edited behind the frozen dataclass: the plan's snapshot of
    # its fields and tag no longer matches, so the batch is checked from scratch and the tag fails.
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = [mgr.seal_model(bytes([i]) * (100 + i)) for i in range(6)]
        mgr.verify_many(shards)
        mgr.verify_many(shards)
        victim = shards[2]
        original = getattr(victim, field)
        object.__setattr__(victim, field, value)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [victim.shard_id]
        assert not info.value.tag_valid
        object.__setattr__(victim, field, original)
        mgr.verify_many(shards)


def test_a_shard_edited_in_place_to_a_non_bytes_tag_is_refused() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = [mgr.seal_model(b"x" * 10), mgr.seal_model(b"y" * 20)]
        mgr.verify_many(shards)
        object.__setattr__(shards[1], "_signature", "not bytes")
        with pytest.raises(TypeError):  # as the check from scratch has always answered it
            mgr.verify_many(shards)


def test_deallocated_and_restored_shards_invalidate_the_plan() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        model = _model(mgr)
        mgr.verify_model(model)
        gone = model.shards[4]
        mgr.deallocate(gone)
        with pytest.raises(NotSealed, match=gone.shard_id):
            mgr.verify_model(model)
        rest = [s for s in model.shards if s is not gone]
        mgr.verify_many(rest)
        mgr.verify_many(rest)
        # Offload and restore: a new record (new buffer) under the same seal.
        moved = rest[0]
        mgr.offload(moved)
        with pytest.raises(NotSealed):
            mgr.verify_many(rest)
        mgr.restore(moved)
        mgr.verify_many(rest)
        flip_bit(mgr, moved, 3)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(rest)
        assert info.value.shard_ids == [moved.shard_id]


def test_a_failed_audit_write_still_raises_on_a_planned_verify() -> None:
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        model = _model(mgr, n=4)
        mgr.verify_model(model)
        audit.fail_on = "SealVerified"
        with pytest.raises(OSError, match="No space left"):
            mgr.verify_model(model)
        audit.fail_on = None
        mgr.verify_model(model)


def test_fast_check_on_a_planned_batch_finds_a_flip() -> None:
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit, fast_check=True) as mgr:
        model = _model(mgr)
        mgr.verify_many(model, check="fast")
        mgr.verify_many(model, check="fast")
        assert {f["check"] for e, f in audit.events if e == "SealVerified"} == {"fast"}
        victim = model.shards[7]
        flip_bit(mgr, victim, 9)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(model, check="fast")
        assert info.value.shard_ids == [victim.shard_id]
        failed = [f for e, f in audit.events if e == "SealVerificationFailed"]
        assert failed[-1]["reason"] == "fast digest mismatch"


def test_the_binding_is_rechecked_when_the_model_changes() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        model = _model(mgr, n=5)
        mgr.verify_model(model)
        mgr.verify_model(model)
        # A renamed part, edited in place behind the frozen dataclass: the binding sees it.
        part = model.parts[1]
        object.__setattr__(part, "name", "renamed")
        with pytest.raises(SealVerificationFailed, match="model digest"):
            mgr.verify_model(model)
        with pytest.raises(SealVerificationFailed, match="model digest"):
            model.check_binding()
        object.__setattr__(part, "name", "layer1.weight")
        mgr.verify_model(model)
        # Two parts swapped, and a model with another ref: new objects, checked from scratch.
        swapped = dataclasses.replace(model, parts=(model.parts[1], model.parts[0], *model.parts[2:]))
        with pytest.raises(SealVerificationFailed, match="not 0 of 5"):
            mgr.verify_model(swapped)
        other = dataclasses.replace(model, model_ref=model.model_ref.replace("@", "x@", 1))
        with pytest.raises(SealVerificationFailed):
            mgr.verify_model(other)
        # A shard's binding field edited in place: caught by the binding before any device work.
        shard = model.parts[2].shard
        object.__setattr__(shard, "shard_index", 3)
        with pytest.raises(SealVerificationFailed, match="sealed as shard 3 of 5"):
            mgr.verify_model(model)
        object.__setattr__(shard, "shard_index", 2)
        mgr.verify_model(model)
        assert model == dataclasses.replace(model)  # the cache is no part of equality


def test_many_batches_keep_verifying_correctly() -> None:
    # More batches than the store keeps plans for: the oldest are dropped, and every batch still
    # verifies (and fails) exactly.
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = [mgr.seal_model(bytes([i % 256]) * (10 + i)) for i in range(40)]
        batches = [shards[i : i + 3] for i in range(38)]
        for _ in range(2):
            for batch in batches:
                mgr.verify_many(batch)
        flip_bit(mgr, shards[20], 0)
        for batch in batches:
            if shards[20] in batch:
                with pytest.raises(SealVerificationFailed):
                    mgr.verify_many(batch)
            else:
                mgr.verify_many(batch)
