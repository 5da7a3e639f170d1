"""Errors of the audit trail and the worker lifecycle.

They extend :class:`vram_residency.errors.VramError` in the same flat style. None of them ever
carries the worker token or the audit key: messages name files, sequence numbers and states only.
"""

from __future__ import annotations

from vram_residency.errors import VramError

__all__ = [
    "AuditLogCorrupt",
    "AuditWriteFailed",
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
