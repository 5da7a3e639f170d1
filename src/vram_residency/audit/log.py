"""The append-only audit log: hash-chained, HMAC-signed JSON Lines on a local file.

Durability contract
    * A **critical** event (see ``events.CRITICAL_EVENTS``) is written and synced to disk before
      :meth:`AuditLog.emit` returns. Concurrent critical emitters share one sync (group commit),
      so many threads do not pay one sync each.
    * Other events are buffered and written when the buffer reaches ``batch_bytes``, when
      ``flush_interval`` seconds pass (a background thread, which also syncs), on a critical
      event (records are written in chain order), and on :meth:`flush` / :meth:`close`.
    * If a write or sync fails, the caller gets :class:`AuditWriteFailed` (fatal) and the log
      refuses every later event: fail closed. The file is cut back to its last complete record
      where possible, so that what is on disk is still a valid chain.

Crash recovery
    A crash can leave a torn last line. Opening the log detects it (bytes after the last newline),
    moves those bytes to a sidecar ``<log>.torn-<seq>`` (synced, so the evidence survives), cuts
    the log back to its last complete record, and appends a critical ``LogRecovered`` marker that
    names the last good hash and the sidecar. :attr:`AuditLog.recovery` reports it, and a warning
    is logged on ``vram_residency.audit``.

Rotation
    When the active file would grow past ``max_bytes``, it is synced and renamed to the next
    number (see ``files.py``), and a new active file starts. The chain does not restart: the
    first record of the new file carries the previous file's last hash as ``prev_hash``.

Head file
    ``<log>.head`` holds the signed ``(seq, hash)`` of the newest record known to be synced. The
    verifier uses it to detect records cut from the end of the log, which a chain alone cannot
    show. The head file also carries the process lock (``flock``): one writer per log. A new log
    gets a signed *empty* head ``(-1, GENESIS_HASH)`` at once (synced), so a non-empty log with
    no head never comes from a crash: it means the head was deleted or emptied.

Head mismatch at open (a restart must not launder deleted records)
    Opening a non-empty log whose head is missing, unreadable, not signed by this key, names a
    record past the log's end (records were removed) or names another record at the log's last
    position is a *head mismatch*. By default (``on_head_mismatch="record"``) the log continues,
    but only after writing two critical records, ``AuditHeadMismatch`` (what the head said and
    what the log holds) and ``SecurityIncident``, and an ERROR on ``vram_residency.incident``;
    :attr:`AuditLog.head_mismatch` keeps the error for the service to report. The head is not
    rewritten before those records are synced, so a failed write leaves the mismatch for the
    next start to find again. ``audit verify`` reports any ``AuditHeadMismatch`` record as
    tampering, for ever: a restart can no longer make ``--require-head`` pass over removed
    records. Why continue rather than refuse: refusing would keep the evidence out of the log
    (only a log line says why the worker is down), and anyone able to delete a file in the
    state directory could keep the worker down, a denial of service; continuing puts signed
    evidence in the chain itself, where ``audit verify`` shows it to anyone with the token, and
    keeps serving models whose seals are checked on the GPU regardless. ``"refuse"`` raises
    :class:`AuditHeadMismatch` instead, for operators who prefer a stopped worker.

Fail closed
    Every I/O error on the audit path (open, write, sync, ``dup``, head update, rotation, close)
    becomes :class:`AuditWriteFailed`; after the first one the log refuses every event. The
    background flusher never dies silently: any error it meets marks the log failed, so the
    next ``emit`` raises. Running out of file descriptors (``EMFILE``, ``ENFILE``: a flood of
    half-open connections does it for a second) loses nothing and is not a failure: a sync
    then runs on the log's own descriptor, and a rotation waits for a free one (the active
    file grows past ``max_bytes`` meanwhile); the log's directory stays open for rotations.

Secrets: the token is turned into the audit key at construction and dropped; the key lives in a
:class:`AuditKey`, which never prints itself. Field names that look like secrets, and any bytes
value, are refused by ``normalize_fields``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno as _errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal

from vram_residency.audit.errors import AuditHeadMismatch, AuditLogCorrupt, AuditWriteFailed
from vram_residency.audit.events import (
    AUDIT_HEAD_MISMATCH,
    LOG_RECOVERED,
    SECURITY_INCIDENT,
    is_critical,
    valid_event_name,
)
from vram_residency.audit.files import default_head_path, rotated_paths, rotation_index
from vram_residency.audit.record import (
    GENESIS_HASH,
    MAX_FIELDS_CHARS,
    AuditKey,
    AuditRecord,
    MacKey,
    RecordFormatError,
    RecordSealer,
    SignedHead,
    check_fields_size,
    check_record,
    encode_fields,
    head_message,
    normalize_fields,
    parse_line,
    parse_signed_head,
)
from vram_residency.audit.verify import verify_log
from vram_residency.errors import ConfigError, InvalidInput

__all__ = ["DEFAULT_AUDIT_PATH", "AuditLog", "LogRecovery"]

logger = logging.getLogger("vram_residency.audit")
#: Seconds between attempts at a rotation that found no free file descriptor.
_ROTATION_RETRY_S: Final = 1.0
incident_logger = logging.getLogger("vram_residency.incident")

DEFAULT_AUDIT_PATH: Final = Path("audit.jsonl")
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_BATCH_BYTES: Final = 256 * 1024
DEFAULT_FLUSH_INTERVAL: Final = 0.2
#: The head is rewritten in place at offset 0 with a fixed length, so a rewrite never changes the
#: file size and a shorter head never leaves bytes of a longer one behind.
_HEAD_SIZE: Final = 256
_TAIL_CHUNK: Final = 64 * 1024

# fdatasync is enough for appended data: Linux also writes the inode size it needs to read the
# data back, and skips timestamps, which makes it measurably faster than fsync on ext4.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


@dataclass(frozen=True, slots=True)
class LogRecovery:
    """What opening a log found and did after a crash left a torn last record."""

    path: str
    torn_bytes: int
    torn_sha256: str
    torn_file: str
    last_good_seq: int | None
    last_good_hash: str
    marker: AuditRecord


@dataclass(slots=True)
class _Tail:
    """The chain state found on disk at open."""

    last: AuditRecord | None
    torn: bytes
    torn_offset: int  # where the torn bytes start in the active file


_second_cache: tuple[int, str] = (-1, "")


def _utc_now() -> str:
    """ISO 8601 UTC with microseconds, e.g. ``2025-01-02T03:04:05.123456Z``."""
    global _second_cache
    secs, rem = divmod(time.time_ns(), 1_000_000_000)
    cached_secs, prefix = _second_cache
    if cached_secs != secs:  # formatting the date part once per second saves ~1 us an event
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _second_cache = (secs, prefix)
    return f"{prefix}.{rem // 1000:06d}Z"


def _fsync_dir(path: Path) -> None:
    # A new or renamed file is only durable once its directory entry is.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - a regular file never returns 0 for a non-empty write
            raise OSError(_errno.EIO, "short write")
        view = view[n:]


#: AuditRecord is a NamedTuple: building it from a tuple skips the keyword-argument __new__,
#: a measurable share of an event. Same record, field for field.
_new_record: Final = tuple.__new__

_open_logs: weakref.WeakSet[AuditLog] = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    # Buffered (non-critical) events would otherwise die with the interpreter.
    for log in list(_open_logs):
        try:
            log.close()
        except Exception:
            logger.exception("closing audit log %s at exit failed", log.path)


def _flusher(ref: weakref.ReferenceType[AuditLog], stop: threading.Event, interval: float) -> None:
    # Holds only a weak reference, so a forgotten log can still be collected.
    while not stop.wait(interval):
        log = ref()
        if log is None:
            return
        try:
            log._timed_flush()
        except AuditWriteFailed as exc:
            # The log is marked failed already (the next emit raises); nothing left to flush.
            logger.error("audit log %s: background flush failed; the log refuses further events", log.path)
            log._notify_failure(exc)
            return
        except BaseException as exc:
            # Anything else (MemoryError, a bug): never die silently with the log still taking
            # events that would then never reach the disk. Fail closed instead.
            log._fail_unexpected(exc, "flush")
            logger.exception(
                "audit log %s: background flush crashed; the log refuses further events", log.path
            )
            try:
                log._check_usable()
            except AuditWriteFailed as failed:
                log._notify_failure(failed)
            return
        finally:
            del log


class AuditLog:
    """Hash-chained, HMAC-signed, append-only audit log (JSON Lines).

    ``AuditLog(path, token=..., worker_id=...)`` opens (or creates) the log, recovers a torn tail,
    and is ready for :meth:`emit`. Thread-safe. Use as a context manager or call :meth:`close`.
    Pass ``key`` (an :class:`AuditKey`, or a :class:`SecretKey` derived with ``AUDIT_KEY_INFO``)
    instead of ``token`` when the caller derives keys itself.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_AUDIT_PATH,
        *,
        worker_id: str,
        token: str | bytes | None = None,
        key: MacKey | None = None,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        head_path: str | os.PathLike[str] | None = None,
        verify_on_open: bool = False,
        on_head_mismatch: Literal["record", "refuse"] = "record",
    ) -> None:
        if (token is None) == (key is None):
            raise ConfigError("AuditLog needs exactly one of token or key")
        # The token itself is not kept: only the derived audit key, which never prints itself.
        self._key: MacKey = key if key is not None else AuditKey(token or b"")
        if not isinstance(worker_id, str) or not worker_id:
            raise ConfigError("worker_id must be a non-empty string")
        if max_bytes is not None and max_bytes < 1024:
            raise ConfigError("max_bytes must be at least 1024 (or None for no rotation)")
        if batch_bytes < 0:
            raise ConfigError("batch_bytes must be >= 0")
        if flush_interval is not None and flush_interval <= 0:
            raise ConfigError("flush_interval must be > 0 (or None for no background flush)")
        if on_head_mismatch not in ("record", "refuse"):
            raise ConfigError("on_head_mismatch must be 'record' or 'refuse'")
        self._on_head_mismatch = on_head_mismatch
        self._path = Path(path)
        self._head_path = Path(head_path) if head_path is not None else default_head_path(self._path)
        self._worker_id = worker_id
        self._sealer = RecordSealer(self._key, worker_id)
        self._max_bytes = max_bytes
        self._batch_bytes = batch_bytes

        # _lock guards the chain (seq, last hash), the buffer and the file descriptor; _sync_lock
        # serializes syncs and head updates. Order: _sync_lock before _lock, never the reverse.
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._failed: AuditWriteFailed | None = None
        self._closed = False
        self._fd = -1
        self._head_fd = -1
        #: add_failure_callback's callbacks (a background flush that fails the log calls them).
        self._failure_callbacks: list[Callable[[AuditWriteFailed], object]] = []
        self._background_failure: AuditWriteFailed | None = None
        #: A rotation put off for want of a descriptor is not tried again before this
        #: (``time.monotonic()``; see ``_rotate_locked``).
        self._rotation_retry_at = 0.0
        #: The log's directory, open for the log's life: a rotation syncs the directory entries
        #: through it instead of opening the directory while descriptors may have run out.
        self._dir_fd = -1
        self._regular = True
        # While True, syncs do not rewrite the head: set while a head mismatch is pending, so the
        # head can only move on once the AuditHeadMismatch record is on disk.
        self._hold_head = False
        self._head_fsynced = True
        self.recovery: LogRecovery | None = None
        #: Set when opening found a head mismatch (and recorded it; see the module docstring).
        self.head_mismatch: AuditHeadMismatch | None = None
        #: The ``incident_id`` of the SecurityIncident record written for ``head_mismatch``.
        self.head_mismatch_incident_id: str | None = None

        self._open(verify_on_open)
        _open_logs.add(self)

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_interval is not None:
            self._thread = threading.Thread(
                target=_flusher,
                args=(weakref.ref(self), self._stop, flush_interval),
                name=f"audit-flush-{self._path.name}",
                daemon=True,
            )
            self._thread.start()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def head_path(self) -> Path:
        return self._head_path

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def last_hash(self) -> str:
        """Hash of the newest record in the chain (written or still buffered)."""
        with self._lock:
            return self._last_hash

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._seq

    @property
    def failed(self) -> bool:
        return self._failed is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"AuditLog(path={str(self._path)!r}, worker_id={self._worker_id!r}, next_seq={self._seq})"

    # ------------------------------------------------------------------ opening

    def _open(self, verify_on_open: bool) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            head_existed = self._head_path.exists()
            self._head_fd = os.open(self._head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditWriteFailed(
                f"cannot open audit log {self._path}: {exc.strerror}",
                path=str(self._path),
                errno=exc.errno,
                operation="open",
            ) from None
        try:
            try:
                fcntl.flock(self._head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"audit log {self._path} is in use by another process") from None
            except OSError as exc:
                raise self._open_error(exc, "lock") from None
            try:
                self._dir_fd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise self._open_error(exc, "open") from None
            # The head file's lock covers one name of the log; a symlink or a hard link to the
            # same file has a head file of its own. So the data file is locked too, before it is
            # read (a second writer must not "recover" the first's batch in flight as a torn
            # tail, nor write a head-mismatch record into its chain).
            try:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # created below, and locked then
            except OSError as exc:
                raise self._open_error(exc, "open") from None
            else:
                self._lock_data()
            if verify_on_open:
                self._verify_existing()
            try:
                tail = self._scan()
            except OSError as exc:
                raise self._open_error(exc, "read") from None
            mismatch = self._check_head(tail.last)
            if mismatch is not None and self._on_head_mismatch == "refuse":
                raise mismatch
            created = self._fd < 0
            try:
                if created:
                    self._fd = os.open(
                        self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                    )
                    self._lock_data()
                st = os.fstat(self._fd)
                self._regular = stat.S_ISREG(st.st_mode)
                if created or not head_existed:
                    _fsync_dir(self._path.parent)
            except OSError as exc:
                raise self._open_error(exc, "open") from None
            last = tail.last
            self._seq = last.seq + 1 if last is not None else 0
            self._last_hash = last.hash if last is not None else GENESIS_HASH
            self._written_seq = self._seq - 1
            self._written_hash = self._last_hash
            self._synced_seq = self._seq - 1
            self._synced_hash = self._last_hash
            self._size = st.st_size if self._regular else 0
            self._next_rotation = self._next_rotation_index()
            if mismatch is not None:
                # Nothing may rewrite the head until the mismatch is on record (see _record_mismatch).
                self._hold_head = True
            elif last is None and not self._head_has_content():
                # A new log: sign an empty head now, and make it durable, so that "records but no
                # head" can only mean the head was removed, never a crash before the first sync.
                self._head_fsynced = False
                try:
                    self._write_head(-1, GENESIS_HASH)
                except OSError as exc:
                    raise self._open_error(exc, "head") from None
            if tail.torn:
                self._recover(tail)
            elif last is not None and mismatch is None:
                # The previous writer may have died between its last write and its sync.
                self._sync_through(last.seq, force=True)
            if mismatch is not None:
                self._record_mismatch(mismatch)
        except BaseException:
            self._close_fds()
            raise

    def _lock_data(self) -> None:
        """Take the data file's own process lock (see ``_open``); ConfigError when another
        writer holds it, under whatever name it opened the log."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"audit log {self._path} is in use by another process (under another name: "
                "a symlink or hard link to the same file)"
            ) from None
        except OSError as exc:
            raise self._open_error(exc, "lock") from None

    def _open_error(self, exc: OSError, what: str) -> AuditWriteFailed:
        return AuditWriteFailed(
            f"cannot open audit log {self._path} ({what}): {exc.strerror or exc}",
            path=str(self._path),
            errno=exc.errno,
            operation="open",
        )

    def _head_has_content(self) -> bool:
        try:
            return bool(os.pread(self._head_fd, _HEAD_SIZE, 0).strip())
        except OSError as exc:
            raise self._open_error(exc, "head") from None

    def _record_mismatch(self, mismatch: AuditHeadMismatch) -> None:
        """Put a head mismatch on record: critical AuditHeadMismatch + SecurityIncident records
        (synced, and only then does the head move on), and an ERROR on the incident logger."""
        self._hold_head = False
        incident_id = uuid.uuid4().hex
        self.emit(
            AUDIT_HEAD_MISMATCH,
            kind=mismatch.kind,
            message=str(mismatch),
            head_seq=mismatch.head_seq,
            head_hash=mismatch.head_hash,
            log_last_seq=mismatch.log_last_seq,
            head_file=self._head_path.name,
            incident_id=incident_id,
        )
        self.emit(
            SECURITY_INCIDENT,
            incident_id=incident_id,
            error_type="AuditHeadMismatch",
            message=str(mismatch),
            shard_id="",
            state_before="Starting",
            fatal=False,
        )
        self.head_mismatch = mismatch
        self.head_mismatch_incident_id = incident_id
        incident_logger.error(
            "SECURITY INCIDENT %s: audit head mismatch at open of %s (%s): %s; recorded in the log, "
            "`audit verify` reports it",
            incident_id,
            self._path,
            mismatch.kind,
            mismatch,
        )

    def _verify_existing(self) -> None:
        files = [*rotated_paths(self._path)]
        if self._path.exists():
            files.append(self._path)
        if not files:
            return
        report = verify_log(files, self._key, head=self._head_path)
        brk = report.first_break
        if brk is not None and not report.torn_tail:
            raise AuditLogCorrupt(
                f"audit log does not verify: {brk.file} record {brk.index}: {brk.reason}", path=brk.file
            )

    def _scan(self) -> _Tail:
        """Find the last complete record of the set and any torn bytes after it."""
        torn = b""
        torn_offset = 0
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise AuditWriteFailed(
                f"cannot read audit log {self._path}: {exc.strerror}", path=str(self._path), errno=exc.errno
            ) from None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size > 0:
            line, torn, torn_offset = _last_line(self._path, st.st_size)
            if line is not None:
                return _Tail(self._checked(line, self._path), torn, torn_offset)
        # The active file is new, empty or holds only a torn line: the chain continues from the
        # newest rotated file (a crash between rotating and writing again leaves exactly this).
        rotated = rotated_paths(self._path)
        if rotated:
            newest = rotated[-1]
            size = newest.stat().st_size
            line, rtorn, _ = _last_line(newest, size)
            if rtorn:
                # Rotated files are synced whole before the rename; a torn one was altered.
                raise AuditLogCorrupt(
                    f"rotated audit file {newest} ends with a partial record", path=str(newest)
                )
            if line is not None:
                return _Tail(self._checked(line, newest), torn, torn_offset)
        return _Tail(None, torn, torn_offset)

    def _checked(self, line: bytes, path: Path) -> AuditRecord:
        try:
            rec, canon = parse_line(line)
        except RecordFormatError as exc:
            raise AuditLogCorrupt(
                f"last record of {path} is malformed ({exc}); refusing to continue its chain", path=str(path)
            ) from None
        reason = check_record(self._key, rec, canon)
        if reason is not None:
            raise AuditLogCorrupt(
                f"last record of {path} (seq {rec.seq}) does not verify: {reason}; refusing to continue "
                "its chain (another token, or an edited log: use a new log path)",
                path=str(path),
            )
        return rec

    def _check_head(self, last: AuditRecord | None) -> AuditHeadMismatch | None:
        """Compare the signed head with the log's last record; describe any mismatch.

        The head is a lower bound (it may lag the log after a crash), so a head *behind* the log
        is normal. A head past the log's end means synced records were removed.
        """
        try:
            raw = os.pread(self._head_fd, _HEAD_SIZE, 0).strip()
        except OSError as exc:
            raise self._open_error(exc, "head") from None
        last_seq = last.seq if last is not None else -1

        def mismatch(
            kind: str, message: str, seq: int | None = None, hash_hex: str | None = None
        ) -> AuditHeadMismatch:
            return AuditHeadMismatch(
                message,
                path=str(self._path),
                kind=kind,
                head_seq=seq,
                head_hash=hash_hex,
                log_last_seq=last_seq,
            )

        if not raw:
            if last is None:
                return None
            return mismatch(
                "missing",
                f"audit log {self._path} has records up to seq {last_seq} but its head file "
                f"{self._head_path.name} is missing or empty: records cut from its end cannot be ruled out",
            )
        head = parse_signed_head(raw, self._key)
        if head is None:
            return mismatch(
                "unsigned",
                f"audit head {self._head_path.name} is unreadable or not signed by this token "
                f"(log ends at seq {last_seq})",
            )
        if head.seq > last_seq:
            return mismatch(
                "truncated",
                f"audit log {self._path} ends at seq {last_seq} but its signed head names seq "
                f"{head.seq}: synced records were removed",
                head.seq,
                head.hash,
            )
        if last is not None and head.seq == last.seq and head.hash != last.hash:
            return mismatch(
                "differs",
                f"last record of {self._path} (seq {last.seq}) differs from the one its signed head names",
                head.seq,
                head.hash,
            )
        return None

    def _next_rotation_index(self) -> int:
        rotated = rotated_paths(self._path)
        return (rotation_index(rotated[-1]) or 0) + 1 if rotated else 1

    def _recover(self, tail: _Tail) -> None:
        last = tail.last
        marker_seq = self._seq
        sidecar = self._path.with_name(f"{self._path.name}.torn-{marker_seq}")
        if sidecar.exists():  # an earlier recovery of the same tail was interrupted
            sidecar = sidecar.with_name(f"{sidecar.name}-{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, tail.torn)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(sidecar.parent)
            # Only now that the evidence is safe, cut the log back to its last complete record.
            os.truncate(self._path, tail.torn_offset)
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditWriteFailed(
                f"cannot recover torn tail of {self._path}: {exc.strerror}",
                path=str(self._path),
                errno=exc.errno,
                operation="recovery",
            ) from None
        self._size = tail.torn_offset
        marker = self.emit(
            LOG_RECOVERED,
            last_good_seq=last.seq if last is not None else None,
            last_good_hash=self._last_hash,
            torn_bytes=len(tail.torn),
            torn_sha256=hashlib.sha256(tail.torn).hexdigest(),
            torn_file=sidecar.name,
        )
        self.recovery = LogRecovery(
            path=str(self._path),
            torn_bytes=len(tail.torn),
            torn_sha256=marker.fields["torn_sha256"],
            torn_file=str(sidecar),
            last_good_seq=last.seq if last is not None else None,
            last_good_hash=marker.prev_hash,
            marker=marker,
        )
        logger.warning(
            "audit log %s had a torn last record (%d bytes, moved to %s); chain continues after "
            "LogRecovered seq %d",
            self._path,
            len(tail.torn),
            sidecar.name,
            marker.seq,
        )

    # ------------------------------------------------------------------ writing

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> AuditRecord:
        """Append one event; return the record as written.

        ``critical`` defaults by event type (``events.is_critical``). A critical event is on disk
        (written and synced) when this returns; otherwise it raises :class:`AuditWriteFailed`.
        A non-critical event may still be in the buffer when this returns.
        """
        if not valid_event_name(event_type):
            raise InvalidInput(f"invalid audit event name {event_type!r}")
        crit = is_critical(event_type) if critical is None else bool(critical)
        norm = normalize_fields(fields, owned=True)  # **fields is a fresh dict of our own
        fields_json = encode_fields(norm)  # outside the lock: other emitters need not wait
        # 128 random bits as the record id: unique across workers and restarts like a UUID4,
        # at a quarter of uuid4()'s cost (the seq already orders records within a chain).
        rid = os.urandom(16).hex()
        try:
            rec = self._append(event_type, crit, norm, fields_json, rid)
            if crit:
                self._sync_through(rec.seq)
        except AuditWriteFailed as exc:
            # Say which event was lost: a caller writing the record of another error (a seal
            # failure, say) raises that error with this one attached (see AuditWriteFailed).
            if exc.event is None:
                exc.event = event_type
            raise
        return rec

    def emit_many(
        self,
        event_type: str,
        fields: Iterable[Mapping[str, Any]],
        *,
        critical: bool | None = None,
        common: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one ``event_type`` event per mapping of ``fields``, in order; return how many.

        ``common``: fields of every event, as if each mapping ``f`` were ``{**common, **f}``
        (``f`` wins a name both have); the verify path passes the batch's shared fields so.

        Writes exactly what ``emit(event_type, **f)`` for each ``f`` in turn would (the same
        bytes but for each record's random id and its time, in the same order, written out at
        the same buffer sizes), holding the lock once for the batch instead of once per event:
        the store's verify path writes one SealVerified record per shard this way. Unlike
        :meth:`emit` it builds no :class:`AuditRecord` objects (nobody reads them on that path,
        and they are a measurable share of an event). Every mapping is validated before the
        first record is appended, so invalid fields (:class:`InvalidInput`) append nothing. A
        critical batch goes through :meth:`emit` one event at a time: each is on disk before
        the next is appended, as for single events. A write failure raises
        :class:`AuditWriteFailed` there and then; the records before it stay in the chain.
        """
        if not valid_event_name(event_type):
            raise InvalidInput(f"invalid audit event name {event_type!r}")
        crit = is_critical(event_type) if critical is None else bool(critical)
        batch = list(fields)
        if common:
            # Validated now, whatever path the batch takes below.
            common = normalize_fields(common)
        if not batch:
            return 0
        cls = type(self)
        one_by_one = crit or (cls.emit is not AuditLog.emit and cls.emit_many is AuditLog.emit_many)
        if common and (one_by_one or not batch[0].keys().isdisjoint(common)):
            # Merged now, into every event: the paths below then see each event's own fields.
            batch = [{**common, **f} for f in batch]
            common = None
        if one_by_one:
            # Critical: each event durable before the next, as emit does. A subclass that
            # changes emit (adds fields, say) but not emit_many must see every event: one by one.
            for f in batch:
                self.emit(event_type, critical=crit, **f)
            return len(batch)
        # Outside the lock: the canonical text of every record but its id, chain link and time.
        # batch_prefixes takes only batches of one set of names with plain scalar values, which
        # normalize_fields would pass through unchanged: checking the first event's names is
        # then all the normalizing the batch needs. Anything else is normalized event by event.
        normalize_fields(batch[0])
        prefixes = self._sealer.batch_prefixes(event_type, False, batch, common)
        if prefixes is None:
            head = self._sealer.head(event_type, False)
            if common:
                batch = [{**common, **f} for f in batch]
            prefixes = [head + encode_fields(normalize_fields(f)) for f in batch]
        if max(map(len, prefixes)) > MAX_FIELDS_CHARS:  # the batch path skips encode_fields
            check_fields_size(max(prefixes, key=len))
        # One call for the batch's ids: 128 random bits each, as emit's.
        ids = os.urandom(16 * len(prefixes)).hex()
        rids = [ids[i : i + 32] for i in range(0, len(ids), 32)]
        try:
            self._append_many(prefixes, rids)
        except AuditWriteFailed as exc:
            if exc.event is None:
                exc.event = event_type
            raise
        return len(prefixes)

    def _append(
        self, event_type: str, crit: bool, norm: dict[str, Any], fields_json: str, rid: str
    ) -> AuditRecord:
        sealer = self._sealer
        prefix = sealer.head(event_type, crit) + fields_json
        with self._lock:
            self._check_usable(event_type)
            seq, prev = self._seq, self._last_hash
            time_s = _utc_now()
            hash_hex, mac_hex, line = sealer.finish(sealer.body(prefix, rid, prev, seq, time_s))
            self._add_line_locked(line, hash_hex)
            if crit or self._buf_bytes >= self._batch_bytes:
                self._write_out_locked()
        view = MappingProxyType(norm)
        row = (seq, rid, time_s, self._worker_id, event_type, crit, view, prev, hash_hex, mac_hex)
        return _new_record(AuditRecord, row)

    def _append_many(self, prefixes: list[str], rids: list[str]) -> None:
        # _append's work per event, in one lock hold, with the hot attributes in locals and
        # RecordSealer.body and .finish inlined: each record's canonical body is its prefix
        # (head and fields JSON) joined with its id, chain link, seq and time. The time is
        # _utc_now's, with the date part formatted once a second. The chain state (seq, last
        # hash) and the buffer counters go back to self before anything that reads them (a
        # write out, a rotation) and when the loop ends, by error or not.
        tag_hex = self._sealer.tag_hex
        tail = self._sealer.tail
        sha256 = hashlib.sha256
        time_ns = time.time_ns
        max_bytes = self._max_bytes
        batch_bytes = self._batch_bytes
        buf = self._buf
        second, next_second, date = 0, 0, ""
        with self._lock:
            self._check_usable()
            seq, prev = self._seq, self._last_hash
            buf_bytes, size = self._buf_bytes, self._size
            dirty = False  # locals ahead of self (lines appended since the last write-back)
            try:
                for prefix, rid in zip(prefixes, rids, strict=True):
                    ns = time_ns()
                    if not second <= ns < next_second:  # a new second (or the clock stepped back)
                        secs = ns // 1_000_000_000
                        second, next_second = secs * 1_000_000_000, (secs + 1) * 1_000_000_000
                        date = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs))
                    text = "".join(
                        (prefix, ',"id":"', rid, '","prev_hash":"', prev, '","seq":', str(seq),
                         ',"time":"', date, f"{(ns - second) // 1000:06d}Z", '",', tail)
                    )  # fmt: skip
                    try:
                        canon = text.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        raise InvalidInput("audit field text is not valid Unicode") from exc
                    hash_hex = sha256(canon).hexdigest()
                    line = f'{text[:-1]},"hash":"{hash_hex}","hmac":"{tag_hex(canon)}"}}\n'.encode()
                    n = len(line)
                    if max_bytes is not None and size > 0 and size + n > max_bytes:
                        self._seq, self._last_hash, self._buf_bytes, self._size = seq, prev, buf_bytes, size
                        dirty = False  # from here self is the truth, also if the calls raise
                        self._write_out_locked()
                        self._rotate_locked()
                        buf_bytes, size = self._buf_bytes, self._size
                    buf.append(line)
                    buf_bytes += n
                    size += n
                    seq += 1
                    prev = hash_hex
                    dirty = True
                    if buf_bytes >= batch_bytes:
                        self._seq, self._last_hash, self._buf_bytes, self._size = seq, prev, buf_bytes, size
                        dirty = False
                        self._write_out_locked()
                        buf_bytes = self._buf_bytes
            finally:
                if dirty:
                    self._seq, self._last_hash, self._buf_bytes, self._size = seq, prev, buf_bytes, size

    def _add_line_locked(self, line: bytes, hash_hex: str) -> None:
        # Rotate first when this line would take the active file past max_bytes.
        if self._max_bytes is not None and self._size > 0 and self._size + len(line) > self._max_bytes:
            self._write_out_locked()
            self._rotate_locked()
        self._buf.append(line)
        self._buf_bytes += len(line)
        self._size += len(line)
        self._seq += 1
        self._last_hash = hash_hex

    def flush(self) -> None:
        """Write every buffered event and sync the file (and the head)."""
        with self._lock:
            self._check_usable()
            target = self._seq - 1
        self._sync_through(target)

    def _timed_flush(self) -> None:
        if self._closed or self._failed is not None:
            return
        if self._buf or self._written_seq > self._synced_seq:
            self.flush()

    def _check_usable(self, event: str | None = None) -> None:
        failed = self._failed
        if failed is not None:
            raise AuditWriteFailed(
                f"audit log {self._path} failed earlier ({failed.operation}) and refuses further events",
                path=str(self._path),
                errno=failed.errno,
                operation=failed.operation,
                event=event,
            ) from failed
        if self._closed:
            raise AuditWriteFailed(f"audit log {self._path} is closed", path=str(self._path), event=event)

    def _fail_locked(self, exc: BaseException, what: str) -> AuditWriteFailed:
        if isinstance(exc, OSError):
            errno, why = exc.errno, exc.strerror or str(exc)
        else:
            errno, why = None, type(exc).__name__
        err = AuditWriteFailed(
            f"audit log {self._path}: {what} failed: {why}", path=str(self._path), errno=errno, operation=what
        )
        if self._failed is None:  # keep the first cause
            self._failed = err
        logger.error("audit log %s: %s failed (%s); refusing further events", self._path, what, why)
        return err

    def add_failure_callback(self, callback: Callable[[AuditWriteFailed], object]) -> None:
        """Call ``callback(error)`` when a background flush fails the log, once, on the
        flusher's thread, with no lock of the log held. Events buffered then are lost, and no
        caller of ``emit`` has seen an error yet: without this, the owner would learn of it only
        at its next event (a worker kept answering Ready meanwhile). Failures that ``emit``,
        ``flush`` or ``close`` raise to their caller are not reported here. A callback that
        raises is logged and the others still run. A callback added after such a failure is
        called at once, on the caller's thread."""
        with self._lock:
            self._failure_callbacks.append(callback)
            already = self._background_failure
        if already is not None:
            self._call_back(callback, already)

    def _notify_failure(self, exc: AuditWriteFailed) -> None:
        with self._lock:
            self._background_failure = exc
            callbacks = list(self._failure_callbacks)
        for callback in callbacks:
            self._call_back(callback, exc)

    def _call_back(self, callback: Callable[[AuditWriteFailed], object], exc: AuditWriteFailed) -> None:
        try:
            callback(exc)
        except Exception:
            logger.exception("audit log %s: a failure callback raised", self._path)

    def _fail_unexpected(self, exc: BaseException, what: str) -> None:
        """Mark the log failed from outside the write path (the background flusher)."""
        with self._lock:
            self._fail_locked(exc, what)

    def _write_out_locked(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        start = self._size - self._buf_bytes
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            err = self._fail_locked(exc, "write")
            if self._regular:
                # Keep the file a valid chain: drop the partial batch (best effort; the error
                # that matters is already raised to the caller).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
            raise err from None
        except BaseException as exc:
            # Interrupted (a KeyboardInterrupt) somewhere in the write: how much landed is not
            # known here. A batch that landed whole is recorded as written, else the next write
            # appends it again (a duplicated record breaks the chain); a part is cut off and the
            # batch stays buffered for the next write. Where that cannot be told (not a regular
            # file, fstat failing) the log fails closed.
            if not self._settle_interrupted_locked(start, len(data)):
                self._fail_locked(exc, "write")
            raise
        self._written_locked()

    def _written_locked(self) -> None:
        self._buf.clear()
        self._buf_bytes = 0
        self._written_seq = self._seq - 1
        self._written_hash = self._last_hash

    def _settle_interrupted_locked(self, start: int, n: int) -> bool:
        """After an interrupted write of ``n`` bytes at ``start``: True once the file holds the
        batch whole (recorded as written) or none of it (a part is truncated away)."""
        if not self._regular:
            return False
        try:
            size = os.fstat(self._fd).st_size
            if size == start + n:
                self._written_locked()
                return True
            if start <= size < start + n:
                os.ftruncate(self._fd, start)
                return True
        except OSError:
            pass
        return False

    def _rotate_locked(self) -> None:
        """Sync and rename the active file, start a new one. Called with everything written.

        The new file is opened before the old descriptor is closed, and the directory is synced
        through the descriptor kept for it: a rotation needs one free descriptor, not two. When
        none is free (a flood of connections has taken them all; EMFILE or ENFILE) the rename is
        undone and the active file grows past ``max_bytes`` until a later append finds one: a
        full descriptor table for a second must not fail the audit log, which would stop the
        worker."""
        if time.monotonic() < self._rotation_retry_at:
            return  # put off a moment ago for want of a descriptor (below): not on every append
        target = self._path.with_name(f"{self._path.name}.{self._next_rotation}")
        try:
            if self._regular:
                _datasync(self._fd)
            os.rename(self._path, target)
        except OSError as exc:
            raise self._fail_locked(exc, "rotation") from None
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (_errno.EMFILE, _errno.ENFILE):
                raise self._fail_locked(exc, "rotation") from None
            try:
                os.rename(target, self._path)
            except OSError as undo:
                raise self._fail_locked(undo, "rotation") from None
            logger.warning(
                "audit log %s: no file descriptor free for its rotation (%s); it grows past its "
                "size limit until one is",
                self._path,
                exc.strerror,
            )
            # Each attempt costs a sync and two renames: the next one waits a little.
            self._rotation_retry_at = time.monotonic() + _ROTATION_RETRY_S
            return
        try:
            # The new file is locked as the first one was (see _open); no one else can hold it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fsync(self._dir_fd)
        except OSError as exc:
            os.close(fd)
            raise self._fail_locked(exc, "rotation") from None
        old, self._fd = self._fd, fd
        with contextlib.suppress(OSError):  # synced above; a failed close loses nothing
            os.close(old)
        self._next_rotation += 1
        self._size = 0

    def _sync_through(self, seq: int, *, force: bool = False) -> None:
        """Make every record up to ``seq`` durable and sign a new head (group commit)."""
        with self._sync_lock:
            if self._synced_seq >= seq and not force:
                return
            with self._lock:
                self._check_usable()
                self._write_out_locked()
                target = self._written_seq
                target_hash = self._written_hash
                # A duplicate descriptor stays valid even if a rotation closes ours meanwhile;
                # syncing outside _lock lets other threads keep appending during the sync. dup
                # fails with EMFILE or ENFILE when descriptors run out (a flood of connections):
                # then the sync runs here, under _lock, on our own descriptor, which no rotation
                # can close meanwhile. Any other error is an audit failure like any other I/O
                # error, never a raw OSError that skips the fail-closed path.
                try:
                    fd = os.dup(self._fd)
                except OSError as exc:
                    if exc.errno not in (_errno.EMFILE, _errno.ENFILE):
                        raise self._fail_locked(exc, "sync") from None
                    fd = -1
                    try:
                        if self._regular:
                            _datasync(self._fd)
                    except OSError as sync_exc:
                        raise self._fail_locked(sync_exc, "sync") from None
            try:
                if fd >= 0:
                    try:
                        if self._regular:
                            _datasync(fd)
                    finally:
                        os.close(fd)
                if target >= 0 and not self._hold_head:
                    self._write_head(target, target_hash)
            except OSError as exc:
                with self._lock:
                    raise self._fail_locked(exc, "sync") from None
            self._synced_seq = target
            self._synced_hash = target_hash

    def _write_head(self, seq: int, hash_hex: str) -> None:
        raw = json.dumps(self._sign_head(seq, hash_hex).to_json(), separators=(",", ":")).encode()
        os.pwrite(self._head_fd, raw.ljust(_HEAD_SIZE - 1) + b"\n", 0)
        if not self._head_fsynced:
            # Synced once, when the head file gets its first content (its size changes then).
            # Later rewrites are in place and not synced on their own: the head is a lower bound,
            # and it may lag the log after a crash.
            os.fsync(self._head_fd)
            self._head_fsynced = True

    def _sign_head(self, seq: int, hash_hex: str) -> SignedHead:
        return SignedHead(seq=seq, hash=hash_hex, hmac=self._key.tag(head_message(seq, hash_hex)).hex())

    def signed_head(self) -> SignedHead:
        """The signed head of everything emitted so far, after making it durable (a flush).

        This is what an orchestrator keeps as an *anchor* (``GET /worker/audit/head``): later,
        ``audit verify --anchor`` fails unless the log still contains that record and extends
        it, which catches a rollback (log cut back and an older head file put back) that the
        head file alone cannot show. ``seq`` is -1 (and ``hash`` the genesis hash) for a log
        with no records. Raises :class:`AuditWriteFailed` when the log has failed or is closed.
        The result holds no secret: the HMAC is a tag.
        """
        with self._lock:
            self._check_usable()
            target = self._seq - 1
        self._sync_through(target)
        with self._sync_lock:
            return self._sign_head(self._synced_seq, self._synced_hash)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Flush, sync and close. Idempotent. Raises AuditWriteFailed if buffered events could
        not be written (they are lost, and the caller must know)."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if self._failed is None:
                with self._lock:
                    target = self._seq - 1
                self._sync_through(target)
        finally:
            with self._sync_lock, self._lock:
                self._closed = True
                self._close_fds()
            _open_logs.discard(self)

    def _close_fds(self) -> None:
        for name in ("_fd", "_head_fd", "_dir_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the head descriptor also releases the flock
                setattr(self, name, -1)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _last_line(path: Path, size: int) -> tuple[bytes | None, bytes, int]:
    """Return (last complete line without its newline, torn bytes after it, offset of torn)."""
    with open(path, "rb") as f:
        # Find the last newline and the one before it, reading backwards a chunk at a time and
        # keeping only the offsets: a file whose last line is huge costs one pass over it, not
        # a copy of everything read so far at each step (quadratic in the line's length).
        newlines: list[int] = []
        pos = size
        while len(newlines) < 2 and pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step)
            end = len(data)
            while len(newlines) < 2 and (at := data.rfind(b"\n", 0, end)) >= 0:
                newlines.append(pos + at)
                end = at
        if not newlines:
            f.seek(0)
            return None, f.read(size), 0
        last_nl = newlines[0]
        start = newlines[1] + 1 if len(newlines) > 1 else 0
        f.seek(start)
        line = f.read(last_nl - start)
        f.seek(last_nl + 1)
        torn = f.read(size - last_nl - 1)
        return line, torn, last_nl + 1
