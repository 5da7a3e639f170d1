"""The audit trail (hash-chained, HMAC-signed JSON Lines) and the worker lifecycle.

The manager and the service use::

    log = AuditLog(path, token=token, worker_id=worker_id)
    log.emit(VRAM_SEALED, shard_id=..., ...)        # -> AuditRecord; critical ones are synced
    lifecycle = WorkerLifecycle(log, worker_id, on_incident=page_someone)
    lifecycle.report_failure(exc)                   # fatal errors: Stopped + SecurityIncident

and ``verify_log(paths, token)`` checks a log offline. ``log.signed_head()`` returns the signed
head an orchestrator keeps as an anchor (``verify_log(..., anchors=[head])``).
"""

from vram_residency.audit.errors import (
    AuditHeadMismatch,
    AuditLogCorrupt,
    AuditWriteFailed,
)
from vram_residency.audit.events import (
    AUDIT_HEAD_MISMATCH,
    CRITICAL_EVENTS,
    INTEGRITY_VIOLATION,
    LOG_RECOVERED,
    POLICY_VIOLATION,
    SEAL_VERIFICATION_FAILED,
    SEAL_VERIFIED,
    SECURITY_INCIDENT,
    SHARD_REPAIRED,
    VRAM_ALLOCATED,
    VRAM_ALLOCATION_FAILED,
    VRAM_DEALLOCATED,
    VRAM_SEALED,
    WORKER_STATE_CHANGED,
    error_fields,
    is_critical,
)
from vram_residency.audit.files import chain_order, rotated_paths
from vram_residency.audit.log import DEFAULT_AUDIT_PATH, AuditLog, LogRecovery
from vram_residency.audit.record import GENESIS_HASH, AuditRecord, SignedHead, canonical_bytes
from vram_residency.audit.verify import VerifyBreak, VerifyReport, verify_log

__all__ = [
    "AUDIT_HEAD_MISMATCH",
    "CRITICAL_EVENTS",
    "DEFAULT_AUDIT_PATH",
    "GENESIS_HASH",
    "INTEGRITY_VIOLATION",
    "LOG_RECOVERED",
    "POLICY_VIOLATION",
    "SEAL_VERIFICATION_FAILED",
    "SEAL_VERIFIED",
    "SECURITY_INCIDENT",
    "SHARD_REPAIRED",
    "VRAM_ALLOCATED",
    "VRAM_ALLOCATION_FAILED",
    "VRAM_DEALLOCATED",
    "VRAM_SEALED",
    "WORKER_STATE_CHANGED",
    "AuditHeadMismatch",
    "AuditLog",
    "AuditLogCorrupt",
    "AuditRecord",
    "AuditWriteFailed",
    "IllegalTransition",
    "Incident",
    "LogRecovery",
    "SignedHead",
    "VerifyBreak",
    "VerifyReport",
    "WorkerLifecycle",
    "WorkerNotReady",
    "WorkerState",
    "WorkerStopped",
    "canonical_bytes",
    "chain_order",
    "error_fields",
    "is_critical",
    "rotated_paths",
    "verify_log",
]


# The worker lifecycle and its errors moved to ``vram_residency.service.lifecycle`` (they are the
# service's state machine, which writes to the audit trail, not part of the trail). These names
# stay importable from here, loaded on first use: importing the audit package must not import
# the service.
_MOVED_TO_SERVICE = frozenset(
    {"IllegalTransition", "Incident", "WorkerLifecycle", "WorkerNotReady", "WorkerState", "WorkerStopped"}
)


def __getattr__(name: str) -> object:
    if name in _MOVED_TO_SERVICE:
        from vram_residency.service import lifecycle

        return getattr(lifecycle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
