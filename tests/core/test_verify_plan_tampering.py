"""Adversarial checks of the verify plans and the tag-check cache: every edit of a
presented shard that a verify from scratch refuses is refused by a planned (or cached) verify
too, whatever its type or however the tags are split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vram_residency import NotSealed, SealVerificationFailed, VramManager

TOKEN = "verify-plan-tamper-token-0123456789"
CAP = 64 << 20


def _shards(mgr: VramManager, n: int = 4) -> list:  # type: ignore[type-arg]
    return [mgr.seal_model(bytes([i + 1]) * (100 + i)) for i in range(n)]


def test_tags_split_differently_across_shards_fail_a_planned_verify() -> None:
    # The joined tags are the same bytes, but shard 1 holds 31 bytes of its tag and shard 2 the
    # 33 bytes of the rest: a verify from scratch refuses both tags, so a planned one must too.
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = _shards(mgr)
        mgr.verify_many(shards)
        a, b = shards[1], shards[2]
        ta, tb = a.tag, b.tag
        object.__setattr__(a, "_signature", ta[:31])
        object.__setattr__(b, "_signature", ta[31:] + tb)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [a.shard_id, b.shard_id]
        assert not info.value.tag_valid
        object.__setattr__(a, "_signature", ta)
        object.__setattr__(b, "_signature", tb)
        mgr.verify_many(shards)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_device", False),  # == 0, but a bool is no seal-v1 integer
        ("vram_bytes", 101.0),  # == 101, but a float is not an integer
    ],
)
def test_an_equal_value_of_another_type_fails_like_a_verify_from_scratch(field: str, value: object) -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = _shards(mgr)
        victim = shards[1]
        original = getattr(victim, field)
        assert original == value and type(original) is not type(value)
        edited = dataclasses.replace(victim, **{field: value})
        # From scratch (nothing cached for the record yet): the edited copy's tag is refused.
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many([edited])
        assert not info.value.tag_valid
        # Warm (the record's check cached, the batch planned): the same copy is refused ...
        mgr.verify_many(shards)
        mgr.verify_many(shards)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many([*shards[:1], edited, *shards[2:]])
        assert info.value.shard_ids == [victim.shard_id] and not info.value.tag_valid
        # ... and so is the planned object itself, edited in place.
        object.__setattr__(victim, field, value)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [victim.shard_id] and not info.value.tag_valid
        object.__setattr__(victim, field, original)
        mgr.verify_many(shards)


class _Liar(str):
    """A string equal to every string: what an edit in place could hide a changed digest with."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


def test_a_str_subclass_that_equals_everything_fails_the_tag() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = _shards(mgr)
        mgr.verify_many(shards)
        victim = shards[0]
        original = victim.digest
        object.__setattr__(victim, "digest", _Liar("f" * 64))
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [victim.shard_id] and not info.value.tag_valid
        object.__setattr__(victim, "digest", original)
        mgr.verify_many(shards)


def test_the_binding_cache_refuses_a_name_that_only_compares_equal() -> None:
    # A part renamed in place to a string equal to everything: the model digest of its real text
    # is not M, so a binding check from scratch refuses it; a cached binding must too.
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(50 + i, dtype=np.uint8) for i in range(4)})
        cold = dataclasses.replace(model)  # no cached binding
        part = model.parts[1]
        original = part.name
        mgr.verify_model(model)
        object.__setattr__(part, "name", _Liar("renamed"))
        with pytest.raises(SealVerificationFailed, match="model digest"):
            cold.check_binding()
        with pytest.raises(SealVerificationFailed, match="model digest"):
            model.check_binding()
        with pytest.raises(SealVerificationFailed, match="model digest"):
            mgr.verify_model(model)
        object.__setattr__(part, "name", original)
        mgr.verify_model(model)


def test_a_copied_or_pickled_model_is_bound_by_its_own_parts() -> None:
    # copy.copy shares the binding cache and pickle carries it: the cache is of values, so a copy
    # whose parts are then changed is checked against what it holds, not what the original held.
    import copy
    import pickle

    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(50 + i, dtype=np.uint8) for i in range(4)})
        mgr.verify_model(model)
        for twin in (copy.copy(model), pickle.loads(pickle.dumps(model))):
            twin.check_binding()
            object.__setattr__(twin, "parts", (twin.parts[1], twin.parts[0], *twin.parts[2:]))
            with pytest.raises(SealVerificationFailed):
                twin.check_binding()
            model.check_binding()


def test_planned_verifies_race_deallocate_offload_restore_and_migrate() -> None:
    # Verifiers repeat the same batches (planned) while other threads deallocate and reseal,
    # offload and restore, and migrate shards of those batches. No verify may fail its seal (the
    # memory is never corrupted), none may deadlock, and the only acceptable error is NotSealed
    # for a shard that was gone when it was looked up or locked.
    import threading
    import time

    with (
        VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr,
        VramManager(TOKEN, backend="host", capacity_bytes=CAP, device=1) as other,
    ):
        model = mgr.seal_tensors({f"w{i}": np.arange(4000 + i, dtype=np.uint8) for i in range(8)})
        loose = [mgr.seal_model(bytes([i + 1]) * (3000 + i)) for i in range(8)]
        stop = time.monotonic() + 2.0
        errors: list[BaseException] = []
        counts = {"ok": 0, "gone": 0}
        guard = threading.Lock()

        def verifier(batch: list) -> None:  # type: ignore[type-arg]
            while time.monotonic() < stop:
                try:
                    mgr.verify_many(batch)
                    outcome = "ok"
                except NotSealed:
                    outcome = "gone"
                except BaseException as exc:
                    errors.append(exc)
                    return
                with guard:
                    counts[outcome] += 1

        def churn() -> None:
            moved = model.shards[3]
            try:
                while time.monotonic() < stop:
                    mgr.offload(moved)
                    mgr.restore(moved)
                    victim = loose.pop(0)
                    mgr.deallocate(victim)
                    loose.append(mgr.seal_model(b"n" * 3001))
                    back = mgr.migrate(loose.pop(0), other)
                    loose.append(other.migrate(back, mgr))
            except BaseException as exc:
                errors.append(exc)

        batches = [list(model.shards), list(model.shards[2:6]), [*model.shards, *loose[:4]]]
        threads = [threading.Thread(target=verifier, args=(b,)) for b in batches for _ in range(2)]
        threads.append(threading.Thread(target=churn))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert errors == []
        assert counts["ok"] > 0
        mgr.verify_model(model)
        mgr.verify_many(loose)


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.fail_on: str | None = None

    def emit(self, event_type: str, **fields: object) -> None:
        if event_type == self.fail_on:
            raise OSError(28, "No space left on device")
        self.events.append((event_type, {k: v for k, v in fields.items() if k != "duration_ns"}))


@pytest.mark.parametrize(
    ("check", "full_every_s"), [("full", None), ("fast", None), ("fast", 0.0), ("fast", 3600.0)]
)
@pytest.mark.parametrize("corrupt", [False, True])
def test_planned_and_unplanned_verifies_audit_and_raise_the_same(
    check: str, full_every_s: float | None, corrupt: bool
) -> None:
    # The same batch (a model's shards, one of them presented twice, plus loose shards) verified
    # with its plan and with every plan dropped first: the same events (count, order, fields),
    # the same error, whether the memory is intact or a shard was flipped.
    from vram_residency.testing import flip_bit

    log = _Log()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=log, fast_check=True) as mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(3000 + i, dtype=np.uint8) for i in range(5)})
        loose = [mgr.seal_model(bytes([i + 1]) * (2000 + i)) for i in range(3)]
        batch = [*model.shards, loose[0], model.shards[2], *loose[1:]]
        mgr.verify_many(batch)  # the plan is made
        if corrupt:
            flip_bit(mgr, batch[1], 17)
            flip_bit(mgr, loose[2], 5)

        def run(planned: bool) -> tuple[list[tuple[str, dict[str, object]]], object]:
            if not planned:
                mgr.store._plans.clear()
            log.events.clear()
            try:
                mgr.verify_many(batch, check=check, full_every_s=full_every_s)  # type: ignore[arg-type]
                outcome: object = None
            except SealVerificationFailed as exc:
                outcome = (str(exc), exc.shard_ids, [dataclasses.astuple(f) for f in exc.failures])
            return list(log.events), outcome

        planned = run(True)
        unplanned = run(False)
        assert planned == unplanned
        assert len(planned[0]) == len(set(map(id, model.shards))) + len(loose)
        assert (planned[1] is None) == (not corrupt)


def test_a_failed_audit_write_on_a_planned_failure_keeps_the_failure() -> None:
    from vram_residency.testing import flip_bit

    log = _Log()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=log) as mgr:
        shards = _shards(mgr)
        mgr.verify_many(shards)
        flip_bit(mgr, shards[2], 3)
        log.fail_on = "SealVerificationFailed"
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        assert info.value.shard_ids == [shards[2].shard_id]
        assert isinstance(info.value.audit_error, OSError)


def test_close_while_planned_verifies_run_frees_everything_and_fails_closed() -> None:
    import threading

    mgr = VramManager(TOKEN, backend="host", capacity_bytes=CAP)
    model = mgr.seal_tensors({f"w{i}": np.arange(200_000 + i, dtype=np.uint8) for i in range(6)})
    mgr.verify_model(model)
    errors: list[BaseException] = []
    started = threading.Event()

    def verifier() -> None:
        try:
            while True:
                mgr.verify_model(model)
                started.set()
        except NotSealed:
            return  # closed (or its shards freed) under it: the only acceptable end
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=verifier) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait(10)
    mgr.close()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert mgr.store._plans == {}
    with pytest.raises(NotSealed):
        mgr.verify_model(model)


def test_a_plan_of_dropped_copies_never_serves_new_objects() -> None:
    # A plan is keyed by the ids of the presented objects. Copies verified once and dropped must
    # not lend their plan to new objects that land at the same addresses: forged copies (another
    # sealed_at_ns) made right after the originals are collected are refused every time.
    import gc

    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = _shards(mgr, 6)
        for round_ in range(20):
            batch = [dataclasses.replace(s) for s in shards]
            mgr.verify_many(batch)
            mgr.verify_many(batch)
            del batch
            gc.collect()
            forged = [dataclasses.replace(s, sealed_at_ns=s.sealed_at_ns + 1 + round_) for s in shards]
            with pytest.raises(SealVerificationFailed) as info:
                mgr.verify_many(forged)
            assert info.value.shard_ids == [s.shard_id for s in shards]
            assert not info.value.tag_valid


def test_no_verify_plan_or_segment_shows_a_shard_key() -> None:
    # nh-fast-v1 is keyed per shard (NH: whoever knows the key can make collisions at will).
    # The verify plan keeps the keyed segments of its batch; neither it nor a segment may show
    # the key in a repr (a traceback with locals, a debug log), as ShardRecord.segments never does.
    import traceback

    from vram_residency.formats.tree import NH_FAST_V1

    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, fast_check=True) as mgr:
        shards = [mgr.seal_model(bytes([i + 1]) * 300, digest_algorithm=NH_FAST_V1) for i in range(3)]
        mgr.verify_many(shards)
        mgr.verify_many(shards, check="fast")
        (plan,) = mgr.store._plans.values()
        keys = [seg.key for seg in plan.segments]
        assert all(k is not None and len(k) == 32 for k in keys)
        record = mgr.store.lookup(shards[0])
        texts = [repr(plan), str(plan), repr(plan.segments), repr(record), repr(mgr.store.segment(record))]
        try:
            mgr.store._verify_full_planned(plan, "bogus")  # type: ignore[arg-type]
        except Exception as exc:
            # The store's frames and their locals (not this test's own, which holds the keys).
            inner = exc.with_traceback(exc.__traceback__.tb_next if exc.__traceback__ else None)
            report = traceback.TracebackException.from_exception(inner, capture_locals=True)
            texts.append("".join(report.format()))
            assert "_verify_full_planned" in texts[-1]
        for text in texts:
            for k in keys:
                assert k is not None
                assert repr(k) not in text and k.hex() not in text


class _LyingLen(bytes):
    """bytes whose ``len`` says 32 whatever they hold: the buffer (what ``b"".join`` and
    ``hmac.compare_digest`` read) is the real one."""

    def __len__(self) -> int:
        return 32


def _outcome(mgr: VramManager, batch: list[object]) -> object:
    try:
        mgr.verify_many(batch)  # type: ignore[arg-type]
    except SealVerificationFailed as exc:
        return ("failed", exc.shard_ids, exc.tag_valid)
    return None


@pytest.mark.parametrize("check", ["full", "fast"])
def test_tags_split_31_33_behind_a_lying_len_are_refused_as_from_scratch(check: str) -> None:
    # The joined tags are unchanged, split 31 + 33 bytes across two shards, in bytes subclasses
    # whose len() says 32: the plan's length check must not take len()'s word for it.
    mgr = VramManager(TOKEN, backend="host", capacity_bytes=CAP, fast_check=True)
    with mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(3000 + i, dtype=np.uint8) for i in range(3)})
        batch: list[object] = list(model.shards)
        mgr.verify_many(model.shards, check=check)  # type: ignore[arg-type]
        mgr.verify_many(model.shards, check=check)  # type: ignore[arg-type]
        assert mgr.store._plans
        a, b = model.shards[0], model.shards[1]
        ta, tb = a.tag, b.tag
        object.__setattr__(a, "_signature", _LyingLen(ta[:31]))
        object.__setattr__(b, "_signature", _LyingLen(ta[31:] + tb))
        planned = _outcome(mgr, batch)
        mgr.store._plans.clear()
        scratch = _outcome(mgr, batch)
        assert scratch == ("failed", [a.shard_id, b.shard_id], False)
        assert planned == scratch
