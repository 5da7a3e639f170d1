"""Audit event names, which of them are critical, and the fields each one usually carries.

Event names are open: later issues may emit new ones (``ShardRepaired``, ...) without touching
this module; a name only has to look like an identifier. Being *critical* decides durability:
a critical event is written and fsynced before ``emit`` returns, the others are batched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Final

from vram_residency.errors import SealVerificationFailed, VramError

__all__ = [
    "ATTESTATION_ISSUED",
    "AUDIT_HEAD_MISMATCH",
    "CRITICAL_EVENTS",
    "EVENT_FIELDS",
    "INTEGRITY_VIOLATION",
    "LOG_RECOVERED",
    "POLICY_VIOLATION",
    "SEAL_VERIFICATION_FAILED",
    "SEAL_VERIFIED",
    "SECURITY_INCIDENT",
    "SHARD_MIGRATED",
    "SHARD_OFFLOADED",
    "SHARD_REPAIRED",
    "SHARD_RESTORED",
    "VRAM_ALLOCATED",
    "VRAM_ALLOCATION_FAILED",
    "VRAM_DEALLOCATED",
    "VRAM_SEALED",
    "WORKER_STATE_CHANGED",
    "error_fields",
    "is_critical",
    "valid_event_name",
]

VRAM_SEALED: Final = "VramSealed"
SEAL_VERIFIED: Final = "SealVerified"
SEAL_VERIFICATION_FAILED: Final = "SealVerificationFailed"
VRAM_ALLOCATED: Final = "VramAllocated"
VRAM_ALLOCATION_FAILED: Final = "VramAllocationFailed"
VRAM_DEALLOCATED: Final = "VramDeallocated"
POLICY_VIOLATION: Final = "PolicyViolation"
INTEGRITY_VIOLATION: Final = "IntegrityViolation"
WORKER_STATE_CHANGED: Final = "WorkerStateChanged"
SECURITY_INCIDENT: Final = "SecurityIncident"
#: Written when a log is reopened after a crash left a torn last record; it names the last good
#: hash and the sidecar file that keeps the torn bytes.
LOG_RECOVERED: Final = "LogRecovered"
SHARD_REPAIRED: Final = "ShardRepaired"
#: An attest-v1 statement was issued for an orchestrator's nonce (hex) with its verdict. Not
#: critical by default (an orchestrator may attest often); the manager emits it as critical when
#: the verdict is "mismatch", since it is then part of a failed verification's evidence.
ATTESTATION_ISSUED: Final = "AttestationIssued"
#: A shard moved to another device under a new seal; names its predecessor (``from_shard_id``).
SHARD_MIGRATED: Final = "ShardMigrated"
SHARD_OFFLOADED: Final = "ShardOffloaded"
SHARD_RESTORED: Final = "ShardRestored"
#: Written when opening a log finds its signed head missing, unsigned, past the log's end or
#: naming another record: evidence that records may have been removed before this restart.
#: ``audit verify`` reports every one of these as tampering.
AUDIT_HEAD_MISMATCH: Final = "AuditHeadMismatch"

#: Events that must be on disk before the call that caused them returns. Integrity events are in
#: here because they are the evidence an investigation needs after the worker is gone; a repair
#: rewrites sealed memory, so it is evidence too; a recovery marker documents a crash.
CRITICAL_EVENTS: Final = frozenset(
    {
        SEAL_VERIFICATION_FAILED,
        POLICY_VIOLATION,
        INTEGRITY_VIOLATION,
        SECURITY_INCIDENT,
        LOG_RECOVERED,
        SHARD_REPAIRED,
        SHARD_MIGRATED,
        AUDIT_HEAD_MISMATCH,
    }
)

#: Documentation of the fields the library itself emits per event (callers may add more). Kept as
#: data so ``audit show`` and the docs can use it; emit does not enforce it, because later issues
#: add fields and an audit call must never fail on a missing optional detail.
EVENT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    VRAM_SEALED: ("shard_id", "gpu_device", "vram_bytes", "digest_algorithm", "digest", "model_ref"),
    SEAL_VERIFIED: ("shard_id", "digest", "duration_ms"),
    SEAL_VERIFICATION_FAILED: (
        "shard_id",
        "expected_digest",
        "actual_digest",
        "corrupted_ranges",
        "corrupted_tensors",
        "tag_valid",
    ),
    VRAM_ALLOCATED: ("shard_id", "gpu_device", "vram_bytes"),
    VRAM_ALLOCATION_FAILED: ("gpu_device", "vram_bytes", "needed", "available", "error"),
    VRAM_DEALLOCATED: ("shard_id", "gpu_device", "vram_bytes"),
    POLICY_VIOLATION: ("shard_id", "error_type", "message"),
    INTEGRITY_VIOLATION: ("shard_id", "error_type", "message"),
    WORKER_STATE_CHANGED: ("from_state", "to_state", "reason"),
    SECURITY_INCIDENT: (
        "incident_id",
        "error_type",
        "message",
        "shard_id",
        "state_before",
        "already_stopped",
        "stop_reason",
    ),
    LOG_RECOVERED: ("last_good_seq", "last_good_hash", "torn_bytes", "torn_sha256", "torn_file"),
    SHARD_REPAIRED: ("shard_id", "repaired_ranges", "source"),
    ATTESTATION_ISSUED: ("nonce", "verdict", "shard_ids", "probe", "failed_shard_ids", "duration_ns"),
    SHARD_MIGRATED: (
        "shard_id",
        "from_shard_id",
        "from_device",
        "to_device",
        "vram_bytes",
        "digest",
        "duration_ns",
        "retried_units",
        "peer_to_peer",
    ),
    SHARD_OFFLOADED: ("shard_id", "vram_bytes", "to", "path"),
    SHARD_RESTORED: ("shard_id", "vram_bytes", "source", "repaired_units", "duration_ns"),
    AUDIT_HEAD_MISMATCH: (
        "kind",
        "message",
        "head_seq",
        "head_hash",
        "log_last_seq",
        "head_file",
        "incident_id",
    ),
}

_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


def valid_event_name(name: object) -> bool:
    """An event name is a CamelCase identifier of at most 64 characters."""
    return isinstance(name, str) and _valid_name(name)


@functools.lru_cache(maxsize=512)
def _valid_name(name: str) -> bool:
    # Cached: a worker emits a handful of names millions of times.
    return _NAME.fullmatch(name) is not None


def is_critical(event_type: str) -> bool:
    """The default durability class of an event type."""
    return event_type in CRITICAL_EVENTS


def error_fields(exc: BaseException) -> dict[str, Any]:
    """Audit fields describing an error, safe to log (errors never carry secrets by contract).

    The manager can write ``audit.emit(SEAL_VERIFICATION_FAILED, **error_fields(exc))``; the
    lifecycle uses it for SecurityIncident events.
    """
    fields: dict[str, Any] = {"error_type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, VramError):
        fields["fatal"] = exc.fatal
    if isinstance(exc, SealVerificationFailed):
        fields.update(
            shard_id=exc.shard_id,
            expected_digest=exc.expected_digest,
            actual_digest=exc.actual_digest,
            corrupted_ranges=[[a, b] for a, b in exc.corrupted_ranges],
            corrupted_tensors=list(exc.corrupted_tensors),
            tag_valid=exc.tag_valid,
        )
    else:
        shard_id = getattr(exc, "shard_id", None)
        if isinstance(shard_id, str) and shard_id:
            fields["shard_id"] = shard_id
    return fields
