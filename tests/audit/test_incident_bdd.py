"""Step definitions for tests/features/incident.feature.

The corruption is a SealVerificationFailed built here, as the manager would raise it: this
feature is about what the lifecycle and the audit trail do with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from tests.audit.audit_helpers import TOKEN, records
from vram_residency.audit import (
    SECURITY_INCIDENT,
    WORKER_STATE_CHANGED,
    AuditLog,
    verify_log,
)
from vram_residency.audit import log as log_module
from vram_residency.errors import IntegrityViolation, PolicyViolation, SealVerificationFailed, VramError
from vram_residency.service.lifecycle import Incident, WorkerLifecycle, WorkerStopped

scenarios("incident.feature")


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {"incidents": [], "callback_fails": False}


@pytest.fixture
def bdd_log(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", token=TOKEN, worker_id="w-1", flush_interval=None)
    yield log
    log.close()


def _corruption(shard: str) -> SealVerificationFailed:
    return SealVerificationFailed(
        f"shard {shard}: digest of device memory does not match its seal",
        shard_id=shard,
        expected_digest="1" * 64,
        actual_digest="2" * 64,
        corrupted_ranges=[(1 << 20, (1 << 20) + 4096)],
        corrupted_tensors=["model.layers.0.self_attn.q_proj.weight"],
    )


@given(parsers.parse('an audit log for worker "{worker_id}"'))
def _audit(bdd_log: AuditLog, worker_id: str) -> None:
    assert bdd_log.worker_id == worker_id


@given("a worker lifecycle with an incident callback")
def _lifecycle(ctx: dict[str, Any], bdd_log: AuditLog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="vram_residency.incident")

    def on_incident(incident: Incident) -> None:
        ctx["incidents"].append(incident)
        if ctx["callback_fails"]:
            raise RuntimeError("pager service unreachable")

    ctx["lifecycle"] = WorkerLifecycle(bdd_log, bdd_log.worker_id, on_incident=on_incident)


@given("the worker has loaded and verified all its shards")
def _loaded(ctx: dict[str, Any]) -> None:
    lc: WorkerLifecycle = ctx["lifecycle"]
    lc.begin_loading()
    lc.mark_ready(lambda: True)  # the manager's "every shard sealed and verified"
    lc.ensure_can_work()


@given("the incident callback fails")
def _callback_fails(ctx: dict[str, Any]) -> None:
    ctx["callback_fails"] = True


@given("the audit disk is full")
def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log_module, "_write_all", enospc)


@when(parsers.parse('verification of shard "{shard}" finds corrupted bytes during execution'))
def _corrupted(ctx: dict[str, Any], shard: str) -> None:
    lc: WorkerLifecycle = ctx["lifecycle"]
    with pytest.raises(SealVerificationFailed), lc.executing():
        raise _corruption(shard)


@when(parsers.parse('the worker reports a {error} for shard "{shard}"'))
def _reports(ctx: dict[str, Any], error: str, shard: str) -> None:
    exc: VramError
    if error == "SealVerificationFailed":
        exc = _corruption(shard)
    elif error == "IntegrityViolation":
        exc = IntegrityViolation("bounds check failed inside the library")
        exc.shard_id = shard  # type: ignore[attr-defined]
    else:
        exc = PolicyViolation("allocation is managed memory, not VRAM")
        exc.shard_id = shard  # type: ignore[attr-defined]
    ctx["lifecycle"].report_failure(exc)


@when("the worker tries to load its shards again")
def _load_again(ctx: dict[str, Any]) -> None:
    try:
        ctx["lifecycle"].begin_loading()
    except WorkerStopped as exc:
        ctx["refused"] = exc


@when("the worker is restarted with a new lifecycle")
def _restart(ctx: dict[str, Any], bdd_log: AuditLog) -> None:
    ctx["lifecycle"] = WorkerLifecycle(bdd_log, bdd_log.worker_id)


@then(parsers.parse('the worker is "{state}"'))
def _state(ctx: dict[str, Any], state: str) -> None:
    assert ctx["lifecycle"].state.value == state


@then(parsers.parse('the incident callback was called once for shard "{shard}"'))
def _called(ctx: dict[str, Any], shard: str) -> None:
    (incident,) = ctx["incidents"]
    assert incident.shard_id == shard


@then(parsers.parse('an error line for shard "{shard}" was logged on "{logger}"'))
def _error_line(caplog: pytest.LogCaptureFixture, shard: str, logger: str) -> None:
    lines = [r for r in caplog.records if r.name == logger and r.levelno == logging.ERROR]
    assert any(shard in r.getMessage() and "SECURITY INCIDENT" in r.getMessage() for r in lines)


@then(parsers.parse('the callback failure was logged on "{logger}"'))
def _callback_logged(caplog: pytest.LogCaptureFixture, logger: str) -> None:
    failures = [r for r in caplog.records if r.name == logger and "callback failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None


@then(parsers.parse('the audit log holds a critical SecurityIncident for shard "{shard}"'))
def _incident_record(bdd_log: AuditLog, shard: str) -> None:
    # Critical: on disk already, without a flush.
    incidents = [o for o in records(bdd_log.path) if o["event"] == SECURITY_INCIDENT]
    assert len(incidents) == 1
    assert incidents[0]["critical"] is True and incidents[0]["fields"]["shard_id"] == shard


@then(parsers.parse('the audit log records the move from "{old}" to "{new}"'))
def _transition(bdd_log: AuditLog, old: str, new: str) -> None:
    moves = [
        (o["fields"]["from_state"], o["fields"]["to_state"])
        for o in records(bdd_log.path)
        if o["event"] == WORKER_STATE_CHANGED
    ]
    assert (old, new) in moves


@then("new work is refused because the worker is stopped")
def _refused(ctx: dict[str, Any]) -> None:
    lc: WorkerLifecycle = ctx["lifecycle"]
    with pytest.raises(WorkerStopped) as info:
        lc.ensure_can_work()
    assert info.value.fatal
    with pytest.raises(WorkerStopped), lc.executing():
        pass


@then("that is refused because the worker is stopped")
def _that_refused(ctx: dict[str, Any]) -> None:
    assert isinstance(ctx.get("refused"), WorkerStopped)


@then("the audit log verifies with the worker token")
def _verifies(bdd_log: AuditLog) -> None:
    bdd_log.flush()
    assert verify_log(bdd_log.path, TOKEN).ok


@then("the incident says its audit record could not be written")
def _not_written(ctx: dict[str, Any]) -> None:
    (incident,) = ctx["incidents"]
    assert incident.audit_record_id is None and incident.audit_error


@then("after loading and verifying its shards it takes work again")
def _works_again(ctx: dict[str, Any]) -> None:
    lc: WorkerLifecycle = ctx["lifecycle"]
    lc.begin_loading()
    lc.mark_ready(True)
    with lc.executing():
        lc.ensure_can_work()
