"""Error codes of the worker API, and the ONE place where domain errors become HTTP.

Every error response (and every SSE ``error`` event) is a JSON object ``{"code", "message",
"retriable", "retry_after_ms"}`` (WORKER-4950s; ``retry_after_ms`` is null unless retrying this
worker later can succeed), plus ``details`` where there are facts to give. A 401 is that envelope
with one fixed message (``AUTH_FAILED_BODY``): nothing about why the token did not match.
Messages come from the library's errors, which never carry a token, a key, a tag or a pointer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from vram_residency.audit.errors import AuditWriteFailed
from vram_residency.distributed import RankUnresponsive, TPVerificationFailed
from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    StaleSeal,
    VramError,
)
from vram_residency.service.catalog import ModelNotFound
from vram_residency.service.errors import (
    JobCancelled,
    JobConflict,
    JobTimedOut,
    ModelAlreadyCommitted,
    ModelLoadFailed,
    ModelNotCommitted,
    ModelNotExecutable,
    PathNotAllowed,
    QueueFull,
    ResourcesExhausted,
    WorkerBusy,
    out_of_descriptors,
)
from vram_residency.service.lifecycle import WorkerNotReady, WorkerStopped

__all__ = ["AUTH_FAILED_BODY", "ErrorCode", "ServiceError", "from_exception"]


class ErrorCode(enum.StrEnum):
    VRAM_OOM = "VRAM_OOM"
    CUDA_ERROR = "CUDA_ERROR"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    SEAL_VERIFICATION_FAILED = "SEAL_VERIFICATION_FAILED"
    INVALID_PARAMS = "INVALID_PARAMS"
    AUTH_FAILED = "AUTH_FAILED"
    INTERNAL = "INTERNAL"
    # Not in llama-orch's list: a client must be able to tell "retry later" (Loading, Draining)
    # from "this worker is finished" (Stopped after an incident or a shutdown).
    WORKER_NOT_READY = "WORKER_NOT_READY"
    WORKER_STOPPED = "WORKER_STOPPED"
    # Additions for a job's end: cancelled (by request or a disconnect), or past its time limit.
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"


#: Every 401's body, the same whatever was wrong (missing, malformed, wrong scheme, wrong token):
#: the contract's envelope, so a client that parses errors parses this one too.
AUTH_FAILED_BODY: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "code": ErrorCode.AUTH_FAILED.value,
        "message": "missing or invalid bearer token",
        "retriable": False,
        "retry_after_ms": None,
    }
)

#: How long a client should wait before retrying a worker that is loading or busy.
RETRY_AFTER_MS_BUSY = 250
RETRY_AFTER_MS_NOT_READY = 1000


class ServiceError(Exception):
    """An error with an HTTP status and an API error code."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        retriable: bool = False,
        retry_after_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retriable = retriable or retry_after_ms is not None
        self.retry_after_ms = retry_after_ms
        self.details = dict(details or {})

    def headers(self) -> dict[str, str]:
        if self.retry_after_ms is None:
            return {}
        return {"Retry-After": str(max(1, -(-self.retry_after_ms // 1000)))}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code.value,
            "message": self.message,
            "retriable": self.retriable,
            "retry_after_ms": self.retry_after_ms,
        }
        if self.details:
            out["details"] = self.details
        return out


def from_exception(exc: BaseException) -> ServiceError:
    """The API error for any exception raised while serving a request."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, TPVerificationFailed):
        # A tensor-parallel group's verdict: the same on every rank, naming the failing ranks.
        return ServiceError(
            500,
            ErrorCode.SEAL_VERIFICATION_FAILED,
            str(exc),
            details={
                "failing_ranks": list(exc.failing_ranks),
                "corrupted_tensors": {str(r): t[:64] for r, t in exc.tensors.items()},
            },
        )
    if isinstance(exc, RankUnresponsive):
        # A rank died, hangs or is unreachable: the group stopped; nothing to retry here.
        return ServiceError(
            503,
            ErrorCode.WORKER_STOPPED,
            str(exc),
            details={"state": "Stopped", "reason": "rank unresponsive"},
        )
    if isinstance(exc, SealVerificationFailed):
        # AttestationMismatch is one too: the attest route answers it with the tagged statement
        # itself; anywhere else it is a failed verification like any other.
        details: dict[str, Any] = {
            "shard_id": exc.shard_id,
            "tag_valid": exc.tag_valid,
            "expected_digest": exc.expected_digest,
            "actual_digest": exc.actual_digest,
            "corrupted_ranges": [list(r) for r in exc.corrupted_ranges[:64]],
            "corrupted_tensors": exc.corrupted_tensors[:64],
        }
        if exc.audit_failed:
            # #17.6: the seal failure is the news and stays the answer; that its audit record
            # was lost as well is said beside it, not instead of it.
            details["audit_write_failed"] = str(exc.audit_error)
        return ServiceError(500, ErrorCode.SEAL_VERIFICATION_FAILED, str(exc), details=details)
    if isinstance(exc, InsufficientVram):
        return ServiceError(
            507,
            ErrorCode.VRAM_OOM,
            str(exc),
            retriable=True,
            details={"needed_bytes": exc.needed, "available_bytes": exc.available},
        )
    if isinstance(exc, CudaAllocationFailed):
        return ServiceError(500, ErrorCode.CUDA_ERROR, str(exc), retriable=True)
    if isinstance(exc, (IntegrityViolation, PolicyViolation)):
        # Both mean device memory is not what it must be; on the host backend they come from the
        # emulation's own checks, on CUDA from the driver or the VRAM-only policy.
        return ServiceError(500, ErrorCode.CUDA_ERROR, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, WorkerStopped):
        return ServiceError(
            503, ErrorCode.WORKER_STOPPED, str(exc), details={"state": "Stopped", "reason": exc.reason}
        )
    if isinstance(exc, StaleSeal):
        # The seal-age policy "refuse": retriable once something verifies the shards again (the
        # scrubber, /worker/verify), which the worker does on its own schedule.
        return ServiceError(
            503,
            ErrorCode.WORKER_NOT_READY,
            str(exc),
            retry_after_ms=RETRY_AFTER_MS_NOT_READY,
            details={"stale_shards": exc.shard_ids},
        )
    if isinstance(exc, WorkerNotReady):
        return ServiceError(
            503,
            ErrorCode.WORKER_NOT_READY,
            str(exc),
            retry_after_ms=RETRY_AFTER_MS_NOT_READY,
            details={"state": exc.state},
        )
    if isinstance(exc, ResourcesExhausted) or out_of_descriptors(exc):
        # No file descriptor was free (a flood of connections): transient, like the connection
        # limit's 503 (the same code), never a 500 "internal error" or a 422 that says "do not
        # retry". The worker keeps running and auditing.
        return ServiceError(
            503,
            ErrorCode.WORKER_NOT_READY,
            str(exc)
            if isinstance(exc, ResourcesExhausted)
            else "the worker is out of file descriptors; retry later",
            retry_after_ms=RETRY_AFTER_MS_NOT_READY,
            details={"reason": "file descriptors exhausted"},
        )
    if isinstance(exc, QueueFull):
        return ServiceError(503, ErrorCode.WORKER_NOT_READY, str(exc), retry_after_ms=RETRY_AFTER_MS_BUSY)
    if isinstance(exc, JobCancelled):
        return ServiceError(409, ErrorCode.CANCELLED, str(exc), details={"reason": exc.reason})
    if isinstance(exc, JobTimedOut):
        return ServiceError(504, ErrorCode.TIMEOUT, str(exc))
    if isinstance(exc, ModelLoadFailed):
        return ServiceError(422, ErrorCode.MODEL_LOAD_FAILED, str(exc))
    if isinstance(exc, WorkerBusy):
        return ServiceError(409, ErrorCode.WORKER_NOT_READY, str(exc), retry_after_ms=RETRY_AFTER_MS_BUSY)
    if isinstance(exc, PathNotAllowed):
        return ServiceError(403, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, (ModelAlreadyCommitted, JobConflict)):
        return ServiceError(409, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, (NotSealed, ModelNotFound, ModelNotCommitted)):
        return ServiceError(404, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, ModelNotExecutable):
        return ServiceError(400, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, MemoryError):
        # Host memory, kept apart from device memory (VRAM_OOM) as the contract asks.
        return ServiceError(
            503, ErrorCode.INTERNAL, "host memory exhausted", retry_after_ms=RETRY_AFTER_MS_NOT_READY
        )
    if isinstance(exc, InvalidInput):
        return ServiceError(400, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, AuditWriteFailed):
        return ServiceError(500, ErrorCode.INTERNAL, f"audit trail failed: {exc}")
    if isinstance(exc, (ConfigError, VramError)):
        return ServiceError(500, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    # Anything else is a bug: say so without leaking internals (the log has the traceback).
    return ServiceError(500, ErrorCode.INTERNAL, "internal error")
