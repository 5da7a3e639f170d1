"""A verify plan's tag check runs while the device digests (``digest_many(while_running=...)``):
an object edited while the digests run is caught by that check, the digests are discarded, and
the verify gives exactly what a verify from scratch gives (verdict, error, audit records). No
verdict, record or audit event comes from a plan that turned out stale, and a failing check or
backend leaves nothing locked.

The backend is the real host backend; a subclass runs an edit (or a failure) at a chosen point
of ``digest_many``: where an edit by another thread could land while a GPU works."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from vram_residency import SealVerificationFailed, VramManager
from vram_residency.backends.base import Priority, Segment, WhileRunning
from vram_residency.backends.host import HostBackend
from vram_residency.errors import IntegrityViolation
from vram_residency.shard import SealedShard

TOKEN = "verify-plan-overlap-token-0123456789"
CAP = 64 << 20


class EditingHost(HostBackend):
    """The host backend, with hooks: ``before`` runs once at the start of the next call (an edit
    landing after the store took its locks, before the tag check); ``fail_after`` makes the next
    call that runs ``while_running`` fail after it (a device error at the synchronization);
    ``drop_callback`` makes calls ignore ``while_running`` (a backend that never calls it)."""

    def __init__(self) -> None:
        super().__init__(0, CAP)
        self.before: Callable[[], None] | None = None
        self.fail_after = False
        self.drop_callback = False
        self.calls: list[bool] = []

    def digest_many(
        self,
        segments: Sequence[Segment],
        *,
        priority: Priority = "normal",
        while_running: WhileRunning | None = None,
    ) -> list[bytes]:
        self.calls.append(while_running is not None)
        hook, self.before = self.before, None
        if hook is not None:
            hook()
        if self.drop_callback:
            while_running = None
        out = super().digest_many(segments, priority=priority, while_running=while_running)
        if self.fail_after and while_running is not None:
            self.fail_after = False
            raise IntegrityViolation("device lost at the synchronization")
        return out


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def emit(self, event_type: str, **fields: object) -> None:
        self.events.append((event_type, {k: v for k, v in fields.items() if k != "duration_ns"}))


def _manager(log: _Log) -> tuple[VramManager, EditingHost]:
    mgr = VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=log, fast_check=True)
    backend = EditingHost()
    mgr.store.backend.close()
    mgr.store._backend = backend  # before anything is sealed: the same class, with the hooks
    return mgr, backend


def _batch(mgr: VramManager) -> list[SealedShard]:
    model = mgr.seal_tensors({f"w{i}": np.arange(3000 + i, dtype=np.uint8) for i in range(4)})
    loose = [mgr.seal_model(bytes([i + 1]) * (2000 + i)) for i in range(2)]
    return [*model.shards, loose[0], model.shards[1], loose[1]]


@contextlib.contextmanager
def _planned() -> Iterator[tuple[_Log, VramManager, EditingHost, list[SealedShard]]]:
    """An open manager on the editing host backend with a batch of shards verified once (so the
    next verify of the batch is planned)."""
    log = _Log()
    mgr, backend = _manager(log)
    with mgr:
        batch = _batch(mgr)
        mgr.verify_many(batch)
        yield log, mgr, backend, batch


def _outcome(run: Callable[[], None]) -> object:
    try:
        run()
    except SealVerificationFailed as exc:
        return ("failed", str(exc), exc.shard_ids, [dataclasses.astuple(f) for f in exc.failures])
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return None


def _fresh(value: object) -> object:
    """An equal value of the same type that is another object (what identity must refuse)."""
    if isinstance(value, str):
        return "".join(list(value))
    if isinstance(value, bytes):
        return bytes(bytearray(value))
    if isinstance(value, int):
        return int(str(value))
    raise AssertionError(type(value))


def _set(shard: SealedShard, name: str, value: object) -> None:
    object.__setattr__(shard, name, value)  # an edit in place of the frozen dataclass


def _split_tags(b: list[SealedShard]) -> None:
    # The joined tags unchanged, split 31 + 33 bytes across two shards.
    t2, t4 = b[2].tag, b[4].tag
    _set(b[2], "_signature", t2[:31])
    _set(b[4], "_signature", t2[31:] + t4)


def _same_values_new_objects(b: list[SealedShard]) -> None:
    # Equal values, other objects: the plan is stale, the verify from scratch passes.
    _set(b[2], "digest", _fresh(b[2].digest))
    _set(b[3], "_signature", _fresh(b[3].tag))


#: Edits of objects of the plan, by name. Each leaves objects a verify from scratch judges.
EDITS: dict[str, Callable[[list[SealedShard]], None]] = {
    "another shard's tag": lambda b: _set(b[2], "_signature", b[0].tag),
    "digest edited": lambda b: _set(b[2], "digest", "0" * 64),
    "equal value of another type": lambda b: _set(b[2], "vram_bytes", float(b[2].vram_bytes)),
    "tag not bytes": lambda b: _set(b[2], "_signature", list(b[2].tag)),
    "tag 31 + 33 bytes": _split_tags,
    "same values, new objects": _same_values_new_objects,
}


@pytest.mark.parametrize("check", ["full", "fast"])
@pytest.mark.parametrize("corrupt", [False, True])
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_while_the_device_digests_gives_the_from_scratch_verdict(
    edit: str, corrupt: bool, check: str
) -> None:
    from vram_residency.testing import flip_bit

    with _planned() as (log, mgr, backend, batch):
        mgr.verify_many(batch, check=check)  # type: ignore[arg-type]
        assert mgr.store._plans  # the batch is planned
        if corrupt:
            flip_bit(mgr, batch[1], 11)
            flip_bit(mgr, batch[4], 3)
        before = mgr.store.last_verified_ns()

        # With the plan: the edit lands inside digest_many, after the locks were taken.
        log.events.clear()
        backend.calls.clear()
        backend.before = lambda: EDITS[edit](batch)
        planned = _outcome(lambda: mgr.verify_many(batch, check=check))  # type: ignore[arg-type]
        planned_events = list(log.events)
        # The planned call's digests were discarded: the verify from scratch followed it.
        assert backend.calls[0] is True
        if edit != "tag not bytes":  # (from scratch, a list tag fails its comparison: TypeError)
            assert backend.calls == [True, False]

        # From scratch, on the edited objects as they are now.
        mgr.store._plans.clear()
        log.events.clear()
        scratch = _outcome(lambda: mgr.verify_many(batch, check=check))  # type: ignore[arg-type]
        assert planned == scratch
        assert planned_events == log.events
        if edit == "same values, new objects" and not corrupt:
            assert planned is None
        else:
            assert planned is not None
        if planned is not None:
            # A failed verify recorded no success for the shards it failed.
            after = mgr.store.last_verified_ns()
            failed = set(planned[2]) if planned[0] == "failed" else set(after)  # type: ignore[index]
            assert all(after[sid] == before[sid] for sid in failed)


def test_a_raising_tag_check_leaves_nothing_locked_or_recorded() -> None:
    # An attribute deleted from an object of the plan while the digests run: the tag check
    # raises AttributeError (as a verify from scratch does); no verdict, no audit event, no
    # record changed, every lock released.
    with _planned() as (log, mgr, backend, batch):
        before = mgr.store.last_verified_ns()
        digest = batch[2].digest
        log.events.clear()
        backend.before = lambda: object.__delattr__(batch[2], "digest")
        with pytest.raises(AttributeError):
            mgr.verify_many(batch)
        assert log.events == []
        assert mgr.store.last_verified_ns() == before
        mgr.store._plans.clear()
        with pytest.raises(AttributeError):  # the same from scratch
            mgr.verify_many(batch)
        object.__setattr__(batch[2], "digest", digest)
        # Nothing is held: another thread verifies and frees the shards at once.
        done: list[BaseException | None] = []

        def other() -> None:
            try:
                mgr.verify_many(batch)
                mgr.deallocate(batch[4])
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
        assert done == [None]


def test_a_device_error_after_a_stale_check_verifies_from_scratch() -> None:
    # The plan turned out stale and the device then failed: as before the overlap, a stale plan
    # gives no verdict of its own; the verify from scratch runs (and meets the device again).
    with _planned() as (_log, mgr, backend, batch):
        backend.before = lambda: object.__setattr__(batch[2], "digest", "0" * 64)
        backend.fail_after = True
        planned = _outcome(lambda: mgr.verify_many(batch))
        assert planned is not None and planned[0] == "failed"  # type: ignore[index]
        assert planned[2] == [batch[2].shard_id]  # type: ignore[index]


def test_a_device_error_after_a_passing_check_propagates_without_a_verdict() -> None:
    with _planned() as (log, mgr, backend, batch):
        before = mgr.store.last_verified_ns()
        log.events.clear()
        backend.fail_after = True
        with pytest.raises(IntegrityViolation, match="device lost"):
            mgr.verify_many(batch)
        assert log.events == []
        assert mgr.store.last_verified_ns() == before
        mgr.verify_many(batch)  # nothing held: the next verify runs and passes
        assert [e for e, _ in log.events] == ["SealVerified"] * len({s.shard_id for s in batch})


@pytest.mark.parametrize("check", ["full", "fast"])
def test_a_backend_that_never_calls_it_still_gets_the_tag_check(check: str) -> None:
    log = _Log()
    mgr, backend = _manager(log)
    with mgr:
        batch = _batch(mgr)
        mgr.verify_many(batch, check=check)  # type: ignore[arg-type]
        backend.drop_callback = True
        mgr.verify_many(batch, check=check)  # type: ignore[arg-type]
        backend.before = lambda: object.__setattr__(batch[2], "_signature", batch[0].tag)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(batch, check=check)  # type: ignore[arg-type]
        assert info.value.shard_ids == [batch[2].shard_id] and not info.value.tag_valid


def test_planned_audit_records_are_those_of_a_verify_from_scratch() -> None:
    # The success path's SealVerified payloads are built by the tag check while the digests run:
    # the records are the same (fields, order, common fields merged) as from scratch.
    log = _Log()
    mgr, _backend = _manager(log)
    with mgr:
        batch = _batch(mgr)
        mgr.verify_many(batch)
        log.events.clear()
        mgr.verify_many(batch)
        planned = list(log.events)
        mgr.store._plans.clear()
        log.events.clear()
        mgr.verify_many(batch)
        assert planned == log.events
        assert len(planned) == len({s.shard_id for s in batch})


@pytest.mark.parametrize("when", ["before the call", "while the digests run"])
@pytest.mark.parametrize(
    "edit",
    ["part renamed", "parts' shards swapped", "shard's index edited"],
)
def test_a_model_binding_broken_gives_the_from_scratch_verdict(when: str, edit: str) -> None:
    # verify_model's binding check runs with the plan's tag check while the digests run. A model
    # whose binding no longer holds fails exactly as from scratch: the binding's
    # SealVerificationFailed, with no SealVerified (or any) record for its shards.
    log = _Log()
    mgr, backend = _manager(log)
    with mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(3000 + i, dtype=np.uint8) for i in range(4)})
        mgr.verify_model(model)
        mgr.verify_model(model)
        assert mgr.store._plans
        parts = model.parts

        def apply() -> None:
            if edit == "part renamed":
                object.__setattr__(parts[1], "name", "w9")
            elif edit == "parts' shards swapped":
                a, b = parts[1].shard, parts[2].shard
                object.__setattr__(parts[1], "shard", b)
                object.__setattr__(parts[2], "shard", a)
            else:
                object.__setattr__(parts[3].shard, "shard_index", 0)

        before = mgr.store.last_verified_ns()
        log.events.clear()
        if when == "before the call":
            apply()
        else:
            backend.before = apply
        planned = _outcome(lambda: mgr.verify_model(model))
        planned_events = list(log.events)
        if edit == "parts' shards swapped" and when == "while the digests run":
            # The shards verified are those the parts held when the call began (read once, as
            # before the overlap), and they were bound: a valid verdict on them. The next verify
            # sees the swap.
            assert planned is None
            before = mgr.store.last_verified_ns()
            log.events.clear()
            planned = _outcome(lambda: mgr.verify_model(model))
            planned_events = list(log.events)
        assert planned is not None
        if edit != "shard's index edited" or when == "before the call":
            assert planned[0] == "failed" and "model" in planned[1]  # type: ignore[index]
        mgr.store._plans.clear()
        model._binding.clear()
        log.events.clear()
        scratch = _outcome(lambda: mgr.verify_model(model))
        assert planned == scratch
        assert planned_events == log.events
        assert [e for e, _ in planned_events if e == "SealVerified"] == []
        assert mgr.store.last_verified_ns() == before


def test_an_intact_model_verifies_planned_with_its_binding_checked_once() -> None:
    log = _Log()
    mgr, backend = _manager(log)
    with mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(3000 + i, dtype=np.uint8) for i in range(4)})
        for _ in range(3):
            backend.calls.clear()
            log.events.clear()
            mgr.verify_model(model)
            assert [e for e, _ in log.events] == ["SealVerified"] * 4
        assert backend.calls == [True]  # planned: one digest_many, with the gate
