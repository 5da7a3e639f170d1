"""Per-request context: the correlation id, the token's fp6 breadcrumb, structured log fields.

* ``X-Correlation-Id`` is taken from the request (when it is a sane id: at most 128 characters
  of ``[A-Za-z0-9._:-]``) or generated, echoed on the response, put on every log line of the
  request (``CorrelationFilter``) and on every audit record written while the request is served
  (``CorrelatedAuditLog``).
* Every authenticated request leaves an INFO breadcrumb with the token's **fp6**: the first 6 hex
  characters of SHA-256(token) (llama-orch's known answer: ``fp6("test") == "9f86d0"``). The token
  itself is never logged.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Final

from vram_residency.audit.log import AuditLog
from vram_residency.audit.record import AuditRecord

__all__ = [
    "CORRELATION_HEADER",
    "CorrelatedAuditLog",
    "CorrelationFilter",
    "CorrelationMiddleware",
    "StructuredFormatter",
    "correlation_id",
    "fp6",
]

CORRELATION_HEADER: Final = "X-Correlation-Id"
_VALID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("vram_correlation_id", default="")

#: Structured fields a service log line may carry (WORKER-4800s), in this order.
LOG_FIELDS: Final = (
    "correlation_id",
    "job_id",
    "worker_id",
    "pool_id",
    "gpu_device",
    "model_ref",
    "tokens_in",
    "tokens_out",
    "decode_time_ms",
    "fp6",
    "human",
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def fp6(token: bytes | str) -> str:
    """The first 6 hex characters of SHA-256(token): a breadcrumb that names no secret."""
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()[:6]


def correlation_id() -> str:
    """The correlation id of the request being served here ("" outside a request)."""
    return _current.get()


def set_correlation_id(value: str) -> contextvars.Token[str]:
    return _current.set(value)


def reset_correlation_id(token: contextvars.Token[str]) -> None:
    _current.reset(token)


def new_correlation_id() -> str:
    return f"corr-{secrets.token_hex(8)}"


class CorrelationMiddleware:
    """Takes or makes the request's correlation id, and echoes it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope.get("headers", ()) if k == b"x-correlation-id"]
        cid = ""
        if len(given) == 1:
            text = given[0].decode("latin-1")
            if _VALID.fullmatch(text):
                cid = text
        cid = cid or new_correlation_id()
        scope.setdefault("state", {})["correlation_id"] = cid
        header = (b"x-correlation-id", cid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        token = _current.set(cid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class CorrelationFilter(logging.Filter):
    """Puts the current request's correlation id on every log record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "correlation_id", ""):
            record.correlation_id = _current.get()
        return True


class StructuredFormatter(logging.Formatter):
    """The usual line, then the structured fields the record carries as ``key=value`` (JSON
    values), so a log shipper can split them and a person can still read the line.

    ``base``: the formatter whose line this extends (a handler's existing one), so that the
    usual line stays exactly as configured."""

    def __init__(self, fmt: str | None = None, *, base: logging.Formatter | None = None) -> None:
        super().__init__(fmt)
        self._base = base

    def format(self, record: logging.LogRecord) -> str:
        line = self._base.format(record) if self._base is not None else super().format(record)
        fields = []
        for name in LOG_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                fields.append(f"{name}={json.dumps(value, separators=(',', ':'))}")
        return f"{line} | {' '.join(fields)}" if fields else line


class CorrelatedAuditLog(AuditLog):
    """The audit log, with the current request's correlation id added to every record written
    while that request is served (commit, verify, deallocate: the records of that request)."""

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> AuditRecord:
        cid = _current.get()
        if cid and "correlation_id" not in fields:
            fields["correlation_id"] = cid
        return super().emit(event_type, critical=critical, **fields)

    def emit_many(
        self,
        event_type: str,
        fields: Iterable[Mapping[str, Any]],
        *,
        critical: bool | None = None,
        common: Mapping[str, Any] | None = None,
    ) -> int:
        # The same correlation id as emit adds, on every record of the batch; as a common
        # field, so an event's own correlation_id still wins, as it does in emit.
        cid = _current.get()
        if cid and (common is None or "correlation_id" not in common):
            common = {**(common or {}), "correlation_id": cid}
        return super().emit_many(event_type, fields, critical=critical, common=common)
