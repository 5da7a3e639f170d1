"""The worker lifecycle: a small state machine with audited transitions and security incidents.

States and legal moves::

    Starting <-> Loading --> Ready <--> Executing
        |           ^  |       |  \\        |
        |           |  |       |   +--> Loading (more shards, a reload)
        |           |  v       v           v
        +-------> Draining <---+-----------+
    (any state) --> Stopped     (and Stopped is final)

* **Ready** is reached only through :meth:`WorkerLifecycle.mark_ready`, and only when every shard
  is sealed and verified (the caller says so, or passes a callable that checks).
* **Executing** is held while at least one ``with lifecycle.executing():`` block runs; the last
  one out returns the worker to Ready (or leaves it Draining if a drain began meanwhile).
* **Stopped** is final. :meth:`report_failure` with a SealVerificationFailed, IntegrityViolation,
  PolicyViolation (or any other fatal ``VramError``) moves there at once and raises a security
  incident: a critical ``SecurityIncident`` audit event, an ERROR line on the logger
  ``vram_residency.incident``, and the user's ``on_incident`` callback. Only constructing a new
  lifecycle (a restart) leaves Stopped. A failure reported when the worker is Stopped already
  (several verifications failing at once) is still an incident of its own, audited with
  ``already_stopped`` true and the ``stop_reason``; :attr:`Incident.already_stopped` tells
  callbacks that must act once per stop (the pool manager's failure callback) to skip it.

Every transition is a ``WorkerStateChanged`` audit event (critical when it enters Stopped).
Transitions into Stopped happen in memory *before* anything that can fail (audit writes, the
callback), so no failure on the incident path can leave a compromised worker serving.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from vram_residency.audit.errors import AuditWriteFailed
from vram_residency.audit.events import SECURITY_INCIDENT, WORKER_STATE_CHANGED, error_fields
from vram_residency.audit.log import AuditLog
from vram_residency.errors import IntegrityViolation, PolicyViolation, SealVerificationFailed, VramError

__all__ = [
    "INCIDENT_ERRORS",
    "IllegalTransition",
    "Incident",
    "WorkerLifecycle",
    "WorkerNotReady",
    "WorkerState",
    "WorkerStopped",
]

# -- worker errors (they belong to the service's lifecycle, not to the audit trail) -----------


class IllegalTransition(VramError):
    """A lifecycle transition that the state machine does not allow (a caller bug, or a Ready
    request while shards are not all verified). The state is unchanged."""

    def __init__(self, message: str, *, from_state: str = "", to_state: str = "") -> None:
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(message)


class WorkerNotReady(VramError):
    """The worker is starting, loading or draining and takes no new work right now."""

    _retriable = True

    def __init__(self, message: str, *, state: str = "") -> None:
        self.state = state
        super().__init__(message)


class WorkerStopped(VramError):
    """The worker is Stopped (after a security incident or a shutdown) and refuses all work.
    Only a restart, that is a new lifecycle, leaves Stopped."""

    _fatal = True

    def __init__(self, message: str = "worker is stopped and refuses all work", *, reason: str = "") -> None:
        self.reason = reason
        super().__init__(message)


incident_logger = logging.getLogger("vram_residency.incident")
logger = logging.getLogger("vram_residency.lifecycle")


class WorkerState(enum.Enum):
    STARTING = "Starting"
    LOADING = "Loading"
    READY = "Ready"
    EXECUTING = "Executing"
    DRAINING = "Draining"
    STOPPED = "Stopped"

    def __str__(self) -> str:
        return self.value


S = WorkerState

_LEGAL: Final[Mapping[WorkerState, frozenset[WorkerState]]] = {
    S.STARTING: frozenset({S.LOADING, S.DRAINING, S.STOPPED}),
    # Loading -> Starting: a first load failed; the worker is as it started, a retry can leave.
    S.LOADING: frozenset({S.READY, S.STARTING, S.DRAINING, S.STOPPED}),
    S.READY: frozenset({S.EXECUTING, S.LOADING, S.DRAINING, S.STOPPED}),
    S.EXECUTING: frozenset({S.READY, S.DRAINING, S.STOPPED}),
    S.DRAINING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
}

#: The errors the issue names as security incidents. Any other *fatal* VramError also stops the
#: worker with an incident (an audit trail that cannot be written, for example): fatal means the
#: worker's sealed memory can no longer be trusted, which is exactly what Stopped is for.
INCIDENT_ERRORS: Final = (SealVerificationFailed, IntegrityViolation, PolicyViolation)


@dataclass(frozen=True, slots=True)
class Incident:
    """A security incident, as given to the ``on_incident`` callback and returned by
    :meth:`WorkerLifecycle.report_failure`."""

    id: str
    worker_id: str
    time_ns: int
    error_type: str
    message: str
    shard_id: str
    state_before: WorkerState
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: Id of the SecurityIncident audit record, or None if it could not be written.
    audit_record_id: str | None = None
    #: Why the audit event could not be written (the worker is Stopped regardless).
    audit_error: str | None = None
    #: False only for an incident the worker survives: an audit head mismatch found when the log
    #: was opened (the log itself wrote its SecurityIncident record, under ``incident_id`` =
    #: ``id``; see ``AuditLog``), reported so that someone looks, while the worker keeps serving.
    stopped: bool = True
    #: True for a detection reported when the worker was Stopped already (several verifications
    #: failing at the same moment, or one after a shutdown): still evidence, audited and given to
    #: ``on_incident``, but it did not stop the worker, so whatever is sent once per transition
    #: to Stopped (the pool manager's failure callback) is not sent again for it.
    already_stopped: bool = False


IncidentCallback = Callable[[Incident], object]


class WorkerLifecycle:
    """State machine of one worker process. Thread-safe.

    ``audit`` may be None (no audit trail, e.g. in tests); ``on_incident`` is called once per
    incident, after the worker is Stopped and the incident is audited and logged.
    """

    def __init__(
        self,
        audit: AuditLog | None,
        worker_id: str,
        *,
        on_incident: IncidentCallback | None = None,
    ) -> None:
        self._audit = audit
        self._worker_id = worker_id
        self._on_incident = on_incident
        self._cond = threading.Condition(threading.RLock())
        self._state = S.STARTING
        self._executing = 0
        self._stop_reason = ""
        self._incidents: list[Incident] = []
        if audit is not None:
            # A background flush that fails the log (a full disk between two requests) stops the
            # worker now, as an event that could not be written would: /health and
            # /worker/ready must not answer as if the trail were still kept. Before the first
            # event, whose flush may be the one that fails.
            audit.add_failure_callback(self._audit_failed)
        self._audit_transition(None, S.STARTING, "lifecycle created")

    def _audit_failed(self, exc: AuditWriteFailed) -> None:
        """The audit log's background flush failed it: an incident, unless the worker is
        Stopped already (a request's event met the failed log first and reported it)."""
        with self._cond:
            if self._state is S.STOPPED:
                return
        self.report_failure(exc)

    # ------------------------------------------------------------------ queries

    @property
    def state(self) -> WorkerState:
        with self._cond:
            return self._state

    @property
    def state_snapshot(self) -> WorkerState:
        """The state read without the lock (one attribute read: a state that was current a moment
        ago). For the event loop: the lock is held across an audited transition, whose write may
        wait for the disk, and nothing on the loop may wait for that."""
        return self._state

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def stopped(self) -> bool:
        with self._cond:
            return self._state is S.STOPPED

    @property
    def in_flight(self) -> int:
        """Number of ``executing()`` blocks running now."""
        with self._cond:
            return self._executing

    @property
    def incidents(self) -> tuple[Incident, ...]:
        with self._cond:
            return tuple(self._incidents)

    def __repr__(self) -> str:
        return f"WorkerLifecycle(worker_id={self._worker_id!r}, state={self._state.value})"

    def ensure_can_work(self) -> None:
        """Raise unless the worker may take new work (Ready or Executing).

        WorkerStopped (fatal) once Stopped; WorkerNotReady (retriable) while Starting, Loading or
        Draining.
        """
        with self._cond:
            state = self._state
            if state is S.STOPPED:
                raise WorkerStopped(reason=self._stop_reason)
            if state not in (S.READY, S.EXECUTING):
                raise WorkerNotReady(f"worker is {state.value} and takes no new work", state=state.value)

    # ------------------------------------------------------------------ transitions

    def _audit_transition(
        self, old: WorkerState | None, new: WorkerState, reason: str, *, critical: bool = False
    ) -> None:
        if self._audit is not None:
            self._audit.emit(
                WORKER_STATE_CHANGED,
                critical=critical,
                from_state=old.value if old is not None else None,
                to_state=new.value,
                reason=reason,
            )

    def _move(self, new: WorkerState, reason: str) -> None:
        """Checked, audited transition (not into Stopped; see ``_stop``). Caller holds the lock.

        The event is written first: if the audit trail refuses it, the transition does not
        happen and the error propagates (fail closed).
        """
        old = self._state
        if old is S.STOPPED:
            raise WorkerStopped(reason=self._stop_reason)
        if new not in _LEGAL[old]:
            raise IllegalTransition(
                f"illegal transition {old.value} -> {new.value}", from_state=old.value, to_state=new.value
            )
        self._audit_transition(old, new, reason)
        self._state = new
        self._cond.notify_all()

    def _stop(self, reason: str) -> tuple[WorkerState, BaseException | None]:
        """Enter Stopped unconditionally; return the previous state and any audit failure."""
        with self._cond:
            old = self._state
            if old is S.STOPPED:
                return old, None
            self._state = S.STOPPED
            self._stop_reason = reason
            self._cond.notify_all()
        try:
            self._audit_transition(old, S.STOPPED, reason, critical=True)
        except Exception as exc:  # the worker is Stopped already; report, do not undo
            logger.error("could not audit the transition to Stopped: %s", exc)
            return old, exc
        return old, None

    def _guarded(self, change: Callable[[], None]) -> None:
        """Run a transition under the lock; a fatal error from it (the audit trail failing)
        stops the worker with an incident, reported after the lock is released."""
        try:
            with self._cond:
                change()
        except VramError as exc:
            self._report_if_fatal(exc)
            raise

    def begin_loading(self, reason: str = "loading shards") -> None:
        """Starting -> Loading, or Ready -> Loading to load more shards (leaves Ready)."""
        self._guarded(lambda: self._move(S.LOADING, reason))

    def abort_loading(self, reason: str = "load failed") -> None:
        """Loading -> Starting after a first load failed with nothing loaded: the worker is back
        where it started, and a retry (a new commit) can leave it. No-op in any other state."""

        def change() -> None:
            if self._state is S.LOADING:
                self._move(S.STARTING, reason)

        self._guarded(change)

    def mark_ready(
        self, all_verified: bool | Callable[[], bool], reason: str = "all shards verified"
    ) -> None:
        """Loading -> Ready, only when every shard is sealed and verified.

        ``all_verified`` is the answer, or a callable asked now (e.g. ``manager.all_verified``).
        A False answer raises IllegalTransition and the worker stays Loading.
        """

        def change() -> None:
            if self._state is S.STOPPED:
                raise WorkerStopped(reason=self._stop_reason)
            if self._state is not S.LOADING:
                raise IllegalTransition(
                    f"illegal transition {self._state.value} -> Ready (only from Loading)",
                    from_state=self._state.value,
                    to_state=S.READY.value,
                )
            ok = all_verified() if callable(all_verified) else all_verified
            if not ok:
                raise IllegalTransition(
                    "Ready requires every shard to be sealed and verified",
                    from_state=self._state.value,
                    to_state=S.READY.value,
                )
            self._move(S.READY, reason)

        self._guarded(change)

    @contextmanager
    def executing(self, *, accepted: bool = False) -> Iterator[None]:
        """Wrap one unit of work: Ready -> Executing, and back to Ready when the last one ends.

        Refuses to start unless the worker can work. ``accepted``: work taken before a drain
        began (a queued job) also runs while Draining, which it leaves as it is: a drain lets
        in-flight jobs finish (WORKER-4960), and a job waiting in the queue is in flight for the
        client that sent it. A fatal error escaping the block is reported (the worker stops, an
        incident is raised) and then re-raised.
        """
        try:
            with self._cond:
                if not (accepted and self._state is S.DRAINING):
                    self.ensure_can_work()
                    if self._executing == 0:
                        self._move(S.EXECUTING, "work started")
                self._executing += 1
        except VramError as exc:
            self._report_if_fatal(exc)
            raise
        ok = False
        try:
            yield
            ok = True
        except VramError as exc:
            self._report_if_fatal(exc)
            raise
        finally:
            end_exc = self._end_execution()
            # An error from the block wins; otherwise a failure to leave Executing is raised.
            if end_exc is not None and ok:
                raise end_exc

    def _end_execution(self) -> VramError | None:
        with self._cond:
            self._executing -= 1
            if self._executing:
                return None
            self._cond.notify_all()
            if self._state is not S.EXECUTING:
                return None  # Draining or Stopped meanwhile: stay there
            try:
                self._move(S.READY, "work finished")
            except VramError as exc:
                end_exc = exc
            else:
                return None
        # Reported outside the lock: the incident path runs the user's callback.
        self._report_if_fatal(end_exc)
        return end_exc

    def _report_if_fatal(self, exc: VramError) -> None:
        if exc.fatal:
            self.report_failure(exc)

    def drain(self, reason: str = "drain requested") -> None:
        """Stop taking new work; running ``executing()`` blocks finish. Idempotent."""

        def change() -> None:
            if self._state not in (S.DRAINING, S.STOPPED):
                self._move(S.DRAINING, reason)

        self._guarded(change)

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until no ``executing()`` block runs; True if drained within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._executing == 0, timeout)

    def stop(self, reason: str = "shutdown") -> None:
        """Enter Stopped (an orderly shutdown; no incident). Idempotent."""
        _, audit_exc = self._stop(reason)
        if audit_exc is not None:
            raise audit_exc

    # ------------------------------------------------------------------ incidents

    def report_failure(self, exc: BaseException) -> Incident | None:
        """Report an error seen while working.

        A SealVerificationFailed, IntegrityViolation, PolicyViolation or any other fatal
        VramError stops the worker and raises a security incident, returned here. Anything else
        is not an incident: the state is unchanged and None is returned.

        Never raises for the incident itself: the worker is Stopped before the audit write, the
        log line and the callback run, and their failures are logged (and kept on the Incident),
        so the caller can go on to re-raise the original error.
        """
        if not (isinstance(exc, INCIDENT_ERRORS) or (isinstance(exc, VramError) and exc.fatal)):
            return None
        if isinstance(exc, WorkerStopped):
            return None  # a consequence of an earlier incident, not a new one
        fields = error_fields(exc)
        shard_id = str(fields.get("shard_id", ""))
        incident_id = os.urandom(16).hex()
        old, transition_exc = self._stop(f"security incident {incident_id}: {type(exc).__name__}")
        # _stop changes the state under the lock, so exactly one report per transition sees a
        # state other than Stopped; every later one is a further detection of a stopped worker.
        already_stopped = old is S.STOPPED
        with self._cond:
            stop_reason = self._stop_reason
        # The later records name what stopped the worker, so that a reader of the log sees these
        # as further evidence of one stop, not as stops of their own.
        stop_fields = {"stop_reason": stop_reason} if already_stopped else {}
        record_id: str | None = None
        audit_error: str | None = None
        if transition_exc is not None:
            audit_error = f"{type(transition_exc).__name__}: {transition_exc}"
        if self._audit is not None:
            try:
                rec = self._audit.emit(
                    SECURITY_INCIDENT,
                    critical=True,
                    incident_id=incident_id,
                    state_before=old.value,
                    already_stopped=already_stopped,
                    **stop_fields,
                    **fields,
                )
                record_id = rec.id
            except Exception as audit_exc:
                audit_error = f"{type(audit_exc).__name__}: {audit_exc}"
        incident = Incident(
            id=incident_id,
            worker_id=self._worker_id,
            time_ns=time.time_ns(),
            error_type=type(exc).__name__,
            message=str(exc),
            shard_id=shard_id,
            state_before=old,
            details=MappingProxyType(fields),
            audit_record_id=record_id,
            audit_error=audit_error,
            already_stopped=already_stopped,
        )
        with self._cond:
            self._incidents.append(incident)
        incident_logger.error(
            "SECURITY INCIDENT %s on worker %s: %s: %s (shard %s, was %s); %s%s",
            incident_id,
            self._worker_id,
            incident.error_type,
            incident.message,
            shard_id or "-",
            old.value,
            f"worker already Stopped ({stop_reason})" if already_stopped else "worker Stopped",
            f"; AUDIT WRITE FAILED: {audit_error}" if audit_error else "",
        )
        if self._on_incident is not None:
            try:
                self._on_incident(incident)
            except Exception:
                # Logged with its traceback, never silently dropped; it must not undo Stopped,
                # and it must not replace the error the caller is about to re-raise.
                incident_logger.exception("on_incident callback failed for incident %s", incident_id)
        return incident
