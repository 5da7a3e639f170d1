"""Error codes of the worker API and the mapping from library errors to them.

Every error response is a JSON object ``{"code": ..., "message": ..., "retriable": ...}`` (plus
``details`` where there are facts to give); a 401 is ``{"code": "AUTH_FAILED"}`` and nothing else.
Messages come from the library's errors, which never carry a token, a key, a tag or a pointer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from vram_residency.audit.errors import AuditWriteFailed, WorkerNotReady, WorkerStopped
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

__all__ = ["ErrorCode", "ServiceError", "from_exception"]


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


class ServiceError(Exception):
    """An error with an HTTP status and an API error code."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        retriable: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retriable = retriable
        self.details = dict(details or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message, "retriable": self.retriable}
        if self.details:
            out["details"] = self.details
        return out


def from_exception(exc: BaseException) -> ServiceError:
    """The API error for any exception raised while serving a request."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, SealVerificationFailed):
        return ServiceError(
            500,
            ErrorCode.SEAL_VERIFICATION_FAILED,
            str(exc),
            details={
                "shard_id": exc.shard_id,
                "tag_valid": exc.tag_valid,
                "expected_digest": exc.expected_digest,
                "actual_digest": exc.actual_digest,
                "corrupted_ranges": [list(r) for r in exc.corrupted_ranges[:64]],
                "corrupted_tensors": exc.corrupted_tensors[:64],
            },
        )
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
        return ServiceError(
            503, ErrorCode.WORKER_NOT_READY, str(exc), retriable=True, details={"stale_shards": exc.shard_ids}
        )
    if isinstance(exc, WorkerNotReady):
        return ServiceError(
            503, ErrorCode.WORKER_NOT_READY, str(exc), retriable=True, details={"state": exc.state}
        )
    if isinstance(exc, (NotSealed, ModelNotFound)):
        return ServiceError(404, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, InvalidInput):
        return ServiceError(400, ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, AuditWriteFailed):
        return ServiceError(500, ErrorCode.INTERNAL, f"audit trail failed: {exc}")
    if isinstance(exc, (ConfigError, VramError)):
        return ServiceError(500, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    # Anything else is a bug: say so without leaking internals (the log has the traceback).
    return ServiceError(500, ErrorCode.INTERNAL, "internal error")
