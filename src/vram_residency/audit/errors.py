"""Errors of the audit trail and the worker lifecycle.

They extend :class:`vram_residency.errors.VramError` in the same flat style. None of them ever
carries the worker token or the audit key: messages name files, sequence numbers and states only.
"""

from __future__ import annotations

from vram_residency.errors import VramError

__all__ = [
    "AuditLogCorrupt",
    "AuditWriteFailed",
    "IllegalTransition",
    "WorkerNotReady",
    "WorkerStopped",
]


class AuditWriteFailed(VramError):
    """An audit record could not be made durable (disk full, permission, I/O error).

    Fatal: a worker that cannot keep its audit trail must not keep serving (fail closed). Once
    raised, the log refuses every later event, because the chain on disk and in memory may differ.
    """

    _fatal = True

    def __init__(self, message: str, *, path: str = "", errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(message)


class AuditLogCorrupt(VramError):
    """An existing log cannot be continued: its last complete record does not verify under this
    worker's audit key (edited, or written under another token). Chaining onto it would vouch for
    a record we cannot authenticate, so opening is refused."""

    _fatal = True

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


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
