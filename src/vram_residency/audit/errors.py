"""Errors of the audit trail.

They extend :class:`vram_residency.errors.VramError` in the same flat style. None of them ever
carries the worker token or the audit key: messages name files, sequence numbers and states only.
"""

from __future__ import annotations

from vram_residency.errors import VramError

__all__ = [
    "AuditHeadMismatch",
    "AuditLogCorrupt",
    "AuditWriteFailed",
]


class AuditWriteFailed(VramError):
    """An audit record could not be made durable (disk full, permission, any I/O error, no file
    descriptor left, a crashed background flusher).

    Fatal: a worker that cannot keep its audit trail must not keep serving (fail closed). Once
    raised, the log refuses every later event, because the chain on disk and in memory may differ.

    Stable attributes (callers build responses and chain errors on them; none carries a secret):

    ``path``
        the log file.
    ``errno``
        the OS error number of the first failure (``None`` when it was not an ``OSError``).
    ``operation``
        what failed first: ``"open"``, ``"write"``, ``"sync"``, ``"rotation"``, ``"recovery"``,
        ``"flush"`` (the background flusher) or ``""``.
    ``event``
        the event type this call tried to write (``None`` for a flush, close or open). A caller
        that was writing the audit record *of another error* (``SealVerificationFailed``, say)
        still holds that error and must raise it, with this one as its cause or context: the
        original error is the news, the lost audit record is the aggravation.
    """

    _fatal = True

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        errno: int | None = None,
        operation: str = "",
        event: str | None = None,
    ) -> None:
        self.path = path
        self.errno = errno
        self.operation = operation
        self.event = event
        super().__init__(message)


class AuditLogCorrupt(VramError):
    """An existing log cannot be continued: its last complete record does not verify under this
    worker's audit key (edited, or written under another token). Chaining onto it would vouch for
    a record we cannot authenticate, so opening is refused."""

    _fatal = True

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class AuditHeadMismatch(VramError):
    """The signed head file does not vouch for the log it sits beside: missing while the log has
    records, unreadable, not signed by this worker's audit key, naming a record past the log's
    end (records were removed), or naming a different record at its position.

    Raised by :class:`~vram_residency.audit.log.AuditLog` at open only with
    ``on_head_mismatch="refuse"``. By default the log continues after writing a critical
    ``AuditHeadMismatch`` record and a ``SecurityIncident`` record (see ``AuditLog``); this
    object is then kept as ``AuditLog.head_mismatch`` so the service can report the incident.
    """

    _fatal = True

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        kind: str = "",
        head_seq: int | None = None,
        head_hash: str | None = None,
        log_last_seq: int | None = None,
    ) -> None:
        self.path = path
        #: ``missing``, ``unsigned`` (unreadable or not signed by this key), ``truncated`` (the
        #: head names a record past the log's end: records were removed) or ``differs``.
        self.kind = kind
        self.head_seq = head_seq
        self.head_hash = head_hash
        self.log_last_seq = log_last_seq
        super().__init__(message)
