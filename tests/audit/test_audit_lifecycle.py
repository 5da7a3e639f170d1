"""WorkerLifecycle: legal transitions, readiness, execution, incidents, the Stopped state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.audit.audit_helpers import TOKEN, records
from vram_residency.audit import (
    SECURITY_INCIDENT,
    WORKER_STATE_CHANGED,
    AuditLog,
    AuditWriteFailed,
    verify_log,
)
from vram_residency.errors import (
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    PolicyViolation,
    SealVerificationFailed,
)
from vram_residency.service.lifecycle import (
    IllegalTransition,
    Incident,
    WorkerLifecycle,
    WorkerNotReady,
    WorkerState,
    WorkerStopped,
)

S = WorkerState


def _st(lc: WorkerLifecycle) -> WorkerState:
    # Through a call, so that mypy does not narrow the property across state changes.
    return lc.state


def _ready(lc: WorkerLifecycle) -> WorkerLifecycle:
    lc.begin_loading()
    lc.mark_ready(True)
    return lc


def _seal_failure(shard: str = "shard-7") -> SealVerificationFailed:
    return SealVerificationFailed(
        "digest mismatch",
        shard_id=shard,
        expected_digest="a" * 64,
        actual_digest="b" * 64,
        corrupted_ranges=[(4096, 8192)],
        corrupted_tensors=["model.layers.3.mlp.weight"],
    )


def _transitions(path: Path) -> list[tuple[str | None, str]]:
    return [
        (o["fields"]["from_state"], o["fields"]["to_state"])
        for o in records(path)
        if o["event"] == WORKER_STATE_CHANGED
    ]


def test_normal_life_is_fully_audited(audit_log: AuditLog, log_path: Path) -> None:
    lc = WorkerLifecycle(audit_log, "w-1")
    assert _st(lc) is S.STARTING
    with pytest.raises(WorkerNotReady) as info:
        lc.ensure_can_work()
    assert info.value.retriable
    lc.begin_loading()
    lc.mark_ready(lambda: True)
    with lc.executing():
        assert _st(lc) is S.EXECUTING
        lc.ensure_can_work()
    assert _st(lc) is S.READY
    lc.drain()
    assert lc.wait_drained(1)
    lc.stop()
    lc.stop()  # idempotent
    audit_log.flush()
    assert _transitions(log_path) == [
        (None, "Starting"),
        ("Starting", "Loading"),
        ("Loading", "Ready"),
        ("Ready", "Executing"),
        ("Executing", "Ready"),
        ("Ready", "Draining"),
        ("Draining", "Stopped"),
    ]
    stopped = [o for o in records(log_path) if o["fields"].get("to_state") == "Stopped"]
    assert stopped[0]["critical"] is True
    assert verify_log(log_path, TOKEN).ok


def test_ready_only_when_every_shard_is_verified(audit_log: AuditLog) -> None:
    lc = WorkerLifecycle(audit_log, "w")
    with pytest.raises(IllegalTransition):
        lc.mark_ready(True)  # not from Starting
    lc.begin_loading()
    with pytest.raises(IllegalTransition, match="verified"):
        lc.mark_ready(False)
    with pytest.raises(IllegalTransition, match="verified"):
        lc.mark_ready(lambda: False)
    assert _st(lc) is S.LOADING
    lc.mark_ready(True)
    assert _st(lc) is S.READY


def test_illegal_transitions_are_refused(audit_log: AuditLog) -> None:
    lc = WorkerLifecycle(audit_log, "w")
    with pytest.raises(WorkerNotReady):
        with lc.executing():
            pass
    lc.begin_loading()
    with pytest.raises(IllegalTransition) as info:
        lc.begin_loading()
    assert info.value.from_state == "Loading" and info.value.to_state == "Loading"
    _ = lc  # Loading -> Draining is legal (shutdown while loading)
    lc.drain()
    with pytest.raises(IllegalTransition):
        lc.begin_loading()
    with pytest.raises(WorkerNotReady):
        lc.ensure_can_work()


@settings(max_examples=40, deadline=None)
@given(moves=st.lists(st.sampled_from(["load", "ready", "exec", "drain", "stop", "fail"]), max_size=12))
def test_state_machine_never_leaves_stopped(moves: list[str]) -> None:
    lc = WorkerLifecycle(None, "w")
    for move in moves:
        was_stopped = lc.stopped
        try:
            if move == "load":
                lc.begin_loading()
            elif move == "ready":
                lc.mark_ready(True)
            elif move == "exec":
                with lc.executing():
                    pass
            elif move == "drain":
                lc.drain()
            elif move == "stop":
                lc.stop()
            else:
                lc.report_failure(IntegrityViolation("bounds check failed"))
        except (IllegalTransition, WorkerNotReady, WorkerStopped):
            pass
        if was_stopped:
            assert lc.stopped
            with pytest.raises(WorkerStopped):
                lc.ensure_can_work()


def test_ready_to_loading_for_more_shards(audit_log: AuditLog) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    lc.begin_loading("second model")
    with pytest.raises(WorkerNotReady):
        lc.ensure_can_work()
    lc.mark_ready(True)
    lc.ensure_can_work()


def test_concurrent_executions_share_the_executing_state(audit_log: AuditLog, log_path: Path) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    inside = threading.Barrier(4)
    leave = threading.Event()

    def work() -> None:
        with lc.executing():
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    inside.wait()
    assert _st(lc) is S.EXECUTING and lc.in_flight == 3
    leave.set()
    for t in threads:
        t.join()
    assert _st(lc) is S.READY and lc.in_flight == 0
    audit_log.flush()
    assert _transitions(log_path).count(("Ready", "Executing")) == 1


def test_drain_during_execution(audit_log: AuditLog) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    with lc.executing():
        lc.drain()
        assert _st(lc) is S.DRAINING
        with pytest.raises(WorkerNotReady):
            lc.ensure_can_work()
        assert not lc.wait_drained(0.01)
    assert _st(lc) is S.DRAINING and lc.wait_drained(0)
    lc.stop()
    assert _st(lc) is S.STOPPED


@pytest.mark.parametrize(
    "exc",
    [_seal_failure(), IntegrityViolation("device pointer is not VRAM"), PolicyViolation("managed memory")],
    ids=["seal", "integrity", "policy"],
)
def test_incident_errors_stop_the_worker(
    audit_log: AuditLog, log_path: Path, exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Incident] = []
    lc = _ready(WorkerLifecycle(audit_log, "w-9", on_incident=seen.append))
    caplog.set_level(logging.ERROR, logger="vram_residency.incident")
    incident = lc.report_failure(exc)
    assert incident is not None and seen == [incident]
    assert _st(lc) is S.STOPPED and lc.incidents == (incident,)
    assert incident.error_type == type(exc).__name__ and incident.state_before is S.READY
    assert incident.audit_record_id is not None and incident.audit_error is None
    with pytest.raises(WorkerStopped) as info:
        lc.ensure_can_work()
    assert info.value.fatal
    # The incident record is on disk already (critical), with the error's facts.
    objs = records(log_path)
    inc = [o for o in objs if o["event"] == SECURITY_INCIDENT]
    assert len(inc) == 1 and inc[0]["critical"] and inc[0]["id"] == incident.audit_record_id
    assert inc[0]["fields"]["error_type"] == type(exc).__name__
    assert inc[0]["fields"]["incident_id"] == incident.id
    assert ("Ready", "Stopped") in _transitions(log_path)
    (line,) = [r for r in caplog.records if r.name == "vram_residency.incident"]
    assert line.levelno == logging.ERROR and incident.id in line.getMessage()
    assert TOKEN not in caplog.text


def test_seal_incident_carries_the_corruption_facts(audit_log: AuditLog, log_path: Path) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    incident = lc.report_failure(_seal_failure("shard-3"))
    assert incident is not None and incident.shard_id == "shard-3"
    assert incident.details["corrupted_ranges"] == [[4096, 8192]]
    (inc,) = [o for o in records(log_path) if o["event"] == SECURITY_INCIDENT]
    assert inc["fields"]["expected_digest"] == "a" * 64 and inc["fields"]["actual_digest"] == "b" * 64
    assert inc["fields"]["corrupted_tensors"] == ["model.layers.3.mlp.weight"]


def test_non_fatal_errors_are_not_incidents(audit_log: AuditLog) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    assert lc.report_failure(InsufficientVram(10, 5)) is None
    assert lc.report_failure(InvalidInput("bad offset")) is None
    assert lc.report_failure(RuntimeError("bug")) is None
    assert _st(lc) is S.READY


def test_fatal_error_escaping_execution_is_reported_and_reraised(audit_log: AuditLog) -> None:
    seen: list[Incident] = []
    lc = _ready(WorkerLifecycle(audit_log, "w", on_incident=seen.append))
    err = _seal_failure()
    with pytest.raises(SealVerificationFailed) as info, lc.executing():
        raise err
    assert info.value is err
    assert _st(lc) is S.STOPPED and len(seen) == 1 and lc.in_flight == 0
    with pytest.raises(WorkerStopped), lc.executing():
        pass


def test_other_errors_in_execution_return_to_ready(audit_log: AuditLog) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    with pytest.raises(InsufficientVram), lc.executing():
        raise InsufficientVram(1, 0)
    assert _st(lc) is S.READY


def test_failing_callback_is_logged_and_worker_still_stops(
    audit_log: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(incident: Incident) -> None:
        raise RuntimeError("pager unreachable")

    lc = _ready(WorkerLifecycle(audit_log, "w", on_incident=boom))
    caplog.set_level(logging.ERROR, logger="vram_residency.incident")
    incident = lc.report_failure(PolicyViolation("host memory"))
    assert incident is not None and _st(lc) is S.STOPPED
    failures = [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None
    assert "pager unreachable" in caplog.text


def test_incident_when_the_audit_trail_is_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", flush_interval=None)
    seen: list[Incident] = []
    lc = WorkerLifecycle(log, "w", on_incident=seen.append)  # Starting: buffered, not yet written
    caplog.set_level(logging.ERROR)
    incident = lc.report_failure(_seal_failure())
    assert _st(lc) is S.STOPPED  # fail closed: the worker stops even if nothing can be recorded
    assert incident is not None and incident.audit_record_id is None
    assert incident.audit_error is not None and "AuditWriteFailed" in incident.audit_error
    assert seen == [incident]
    assert "AUDIT WRITE FAILED" in caplog.text
    log.close()


def test_audit_failure_blocks_a_normal_transition_and_stops(tmp_path: Path) -> None:
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", batch_bytes=0)
    with pytest.raises(AuditWriteFailed):
        WorkerLifecycle(log, "w")  # even the first event cannot be written: refuse to start
    log.close()


def test_audit_failure_when_leaving_execution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None)
    lc = _ready(WorkerLifecycle(log, "w"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AuditWriteFailed("disk gone")

    with pytest.raises(AuditWriteFailed), lc.executing():
        monkeypatch.setattr(log, "emit", refuse)
    assert _st(lc) is S.STOPPED and lc.incidents
    log.close()


def test_restart_is_a_new_lifecycle(audit_log: AuditLog, log_path: Path) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    lc.report_failure(_seal_failure())
    with pytest.raises(WorkerStopped):
        lc.begin_loading()
    with pytest.raises(WorkerStopped):
        lc.mark_ready(True)
    lc.drain()  # a no-op once Stopped
    assert _st(lc) is S.STOPPED
    again = _ready(WorkerLifecycle(audit_log, "w"))
    again.ensure_can_work()
    audit_log.flush()
    assert (None, "Starting") in _transitions(log_path)[1:]
    assert verify_log(log_path, TOKEN).ok


def test_second_failure_after_stop_is_still_recorded(audit_log: AuditLog, log_path: Path) -> None:
    lc = _ready(WorkerLifecycle(audit_log, "w"))
    lc.report_failure(_seal_failure("a"))
    lc.report_failure(_seal_failure("b"))
    assert len(lc.incidents) == 2 and lc.incidents[1].state_before is S.STOPPED
    assert lc.report_failure(WorkerStopped()) is None
    assert sum(o["event"] == SECURITY_INCIDENT for o in records(log_path)) == 2


def test_no_audit_log_is_allowed() -> None:
    lc = _ready(WorkerLifecycle(None, "w"))
    assert lc.report_failure(_seal_failure()) is not None and lc.stopped
    assert "Stopped" in repr(lc)


def test_audit_failure_on_any_transition_stops_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None)
    seen: list[Incident] = []
    lc = WorkerLifecycle(log, "w", on_incident=seen.append)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AuditWriteFailed("disk gone")

    monkeypatch.setattr(log, "emit", refuse)
    with pytest.raises(AuditWriteFailed):
        lc.begin_loading()
    assert _st(lc) is S.STOPPED and len(seen) == 1 and seen[0].error_type == "AuditWriteFailed"
    log.close()


@pytest.mark.parametrize(
    "name",
    ["IllegalTransition", "Incident", "WorkerLifecycle", "WorkerNotReady", "WorkerState", "WorkerStopped"],
)
def test_moved_names_stay_importable_from_audit(name: str) -> None:
    # The lifecycle lives in the service; `vram_residency.audit` still hands out the same objects
    # (loaded on first use), so code written against the old import keeps working.
    import vram_residency.audit
    import vram_residency.service.lifecycle

    assert getattr(vram_residency.audit, name) is getattr(vram_residency.service.lifecycle, name)


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_background_flush_that_fails_the_log_stops_the_worker_at_once(tmp_path: Path) -> None:
    """A real full device (/dev/full): the events of a worker that is Ready and idle sit in the
    buffer until the background flush, which fails. No caller of emit sees that error, so before
    the failure callback the worker kept answering Ready until its next event. Now the worker
    is Stopped with one incident as soon as the flush fails."""
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", flush_interval=0.05)
    seen: list[Incident] = []
    lc = WorkerLifecycle(log, "w", on_incident=seen.append)
    assert _wait_for(lambda: lc.stopped), "the worker kept going with a failed audit log"
    assert _wait_for(lambda: len(seen) == 1)
    assert seen[0].error_type == "AuditWriteFailed" and seen[0].stopped
    assert len(lc.incidents) == 1
    with pytest.raises(WorkerStopped):
        lc.ensure_can_work()
    time.sleep(0.2)  # no second incident from the same failure
    assert len(seen) == 1
    log.close()


def test_failure_callbacks_run_once_and_late_ones_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", flush_interval=0.05)
    got: list[AuditWriteFailed] = []

    def broken(exc: AuditWriteFailed) -> None:
        raise RuntimeError("a callback's own bug")

    log.add_failure_callback(broken)  # raises: logged, and the next callback still runs
    log.add_failure_callback(got.append)
    log.emit(WORKER_STATE_CHANGED, from_state=None, to_state="Starting", reason="r")  # buffered
    assert _wait_for(lambda: len(got) == 1)
    assert got[0].errno is not None and log.failed
    assert "a failure callback raised" in caplog.text
    late: list[AuditWriteFailed] = []
    log.add_failure_callback(late.append)  # after the failure: called at once
    assert late == got
    time.sleep(0.2)
    assert len(got) == 1  # once
    log.close()


def test_an_error_raised_to_the_caller_is_not_a_background_failure(tmp_path: Path) -> None:
    # A critical event is written and synced by emit itself: its failure reaches the caller, who
    # reports it; the callback is for failures no caller sees.
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", flush_interval=None)
    got: list[AuditWriteFailed] = []
    log.add_failure_callback(got.append)
    with pytest.raises(AuditWriteFailed):
        log.emit(SECURITY_INCIDENT, critical=True, incident_id="0" * 32, state_before="Ready")
    assert got == []
    log.close()
