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
    show. The head file also carries the process lock (``flock``): one writer per log.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from vram_residency.audit.errors import AuditLogCorrupt, AuditWriteFailed
from vram_residency.audit.events import LOG_RECOVERED, is_critical, valid_event_name
from vram_residency.audit.files import default_head_path, rotated_paths, rotation_index
from vram_residency.audit.record import (
    GENESIS_HASH,
    AuditKey,
    AuditRecord,
    MacKey,
    RecordFormatError,
    check_record,
    head_message,
    normalize_fields,
    parse_line,
)
from vram_residency.audit.verify import verify_log
from vram_residency.errors import ConfigError, InvalidInput

__all__ = ["DEFAULT_AUDIT_PATH", "AuditLog", "LogRecovery"]

logger = logging.getLogger("vram_residency.audit")

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
        except AuditWriteFailed:
            logger.error("audit log %s: background flush failed; the log refuses further events", log.path)
            return
        except Exception:
            logger.exception("audit log %s: background flush crashed", log.path)
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
        self._path = Path(path)
        self._head_path = Path(head_path) if head_path is not None else default_head_path(self._path)
        self._worker_id = worker_id
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
        self._regular = True
        self.recovery: LogRecovery | None = None

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
            self._head_fd = os.open(self._head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditWriteFailed(
                f"cannot open audit log {self._path}: {exc.strerror}", path=str(self._path), errno=exc.errno
            ) from None
        try:
            try:
                fcntl.flock(self._head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"audit log {self._path} is in use by another process") from None
            if verify_on_open:
                self._verify_existing()
            tail = self._scan()
            self._check_head(tail.last)
            created = not self._path.exists()
            try:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                st = os.fstat(self._fd)
                self._regular = stat.S_ISREG(st.st_mode)
                if created:
                    _fsync_dir(self._path.parent)
            except OSError as exc:
                raise AuditWriteFailed(
                    f"cannot open audit log {self._path}: {exc.strerror}",
                    path=str(self._path),
                    errno=exc.errno,
                ) from None
            last = tail.last
            self._seq = last.seq + 1 if last is not None else 0
            self._last_hash = last.hash if last is not None else GENESIS_HASH
            self._written_seq = self._seq - 1
            self._written_hash = self._last_hash
            self._synced_seq = self._seq - 1
            self._size = st.st_size if self._regular else 0
            self._next_rotation = self._next_rotation_index()
            if tail.torn:
                self._recover(tail)
            elif last is not None:
                # The previous writer may have died between its last write and its sync.
                self._sync_through(last.seq, force=True)
        except BaseException:
            self._close_fds()
            raise

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

    def _check_head(self, last: AuditRecord | None) -> None:
        """A head naming a record past the end means synced records were removed: refuse."""
        try:
            raw = os.pread(self._head_fd, _HEAD_SIZE, 0).strip()
        except OSError as exc:
            raise AuditWriteFailed(f"cannot read audit head {self._head_path}: {exc.strerror}") from None
        if not raw:
            return
        head = _parse_head(raw, self._key)
        if head is None:
            raise AuditLogCorrupt(f"audit head {self._head_path} is unreadable or not signed by this token")
        seq, hash_hex = head
        last_seq = last.seq if last is not None else -1
        if seq > last_seq:
            raise AuditLogCorrupt(
                f"audit log {self._path} ends at seq {last_seq} but its signed head names seq {seq}: "
                "synced records were removed",
                path=str(self._path),
            )
        if last is not None and seq == last.seq and hash_hex != last.hash:
            raise AuditLogCorrupt(
                f"last record of {self._path} differs from the signed head", path=str(self._path)
            )

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
        norm = normalize_fields(fields)
        # 128 random bits as the record id: unique across workers and restarts like a UUID4,
        # at a quarter of uuid4()'s cost (the seq already orders records within a chain).
        rid = os.urandom(16).hex()
        with self._lock:
            self._check_usable()
            rec, line = AuditRecord.seal(
                self._key,
                seq=self._seq,
                id=rid,
                time=_utc_now(),
                worker_id=self._worker_id,
                event=event_type,
                critical=crit,
                fields=norm,
                prev_hash=self._last_hash,
            )
            if self._max_bytes is not None and self._size > 0 and self._size + len(line) > self._max_bytes:
                self._write_out_locked()
                self._rotate_locked()
            self._buf.append(line)
            self._buf_bytes += len(line)
            self._size += len(line)
            self._seq += 1
            self._last_hash = rec.hash
            if crit or self._buf_bytes >= self._batch_bytes:
                self._write_out_locked()
        if crit:
            self._sync_through(rec.seq)
        return rec

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

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise AuditWriteFailed(
                f"audit log {self._path} failed earlier and refuses further events", path=str(self._path)
            ) from self._failed
        if self._closed:
            raise AuditWriteFailed(f"audit log {self._path} is closed", path=str(self._path))

    def _fail_locked(self, exc: OSError, what: str) -> AuditWriteFailed:
        err = AuditWriteFailed(
            f"audit log {self._path}: {what} failed: {exc.strerror or exc}",
            path=str(self._path),
            errno=exc.errno,
        )
        self._failed = err
        logger.error("audit log %s: %s failed (%s); refusing further events", self._path, what, exc.strerror)
        return err

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
        self._buf.clear()
        self._buf_bytes = 0
        self._written_seq = self._seq - 1
        self._written_hash = self._last_hash

    def _rotate_locked(self) -> None:
        """Sync and rename the active file, start a new one. Called with everything written."""
        target = self._path.with_name(f"{self._path.name}.{self._next_rotation}")
        try:
            if self._regular:
                _datasync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.rename(self._path, target)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            _fsync_dir(self._path.parent)
        except OSError as exc:
            raise self._fail_locked(exc, "rotation") from None
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
                # syncing outside _lock lets other threads keep appending during the sync.
                fd = os.dup(self._fd)
            try:
                if self._regular:
                    _datasync(fd)
                if target >= 0:
                    self._write_head(target, target_hash)
            except OSError as exc:
                with self._lock:
                    raise self._fail_locked(exc, "sync") from None
            finally:
                os.close(fd)
            self._synced_seq = target

    def _write_head(self, seq: int, hash_hex: str) -> None:
        mac = self._key.tag(head_message(seq, hash_hex)).hex()
        raw = json.dumps({"v": 1, "seq": seq, "hash": hash_hex, "hmac": mac}, separators=(",", ":")).encode()
        # Not synced on its own: the head is a lower bound, and it may lag the log after a crash.
        os.pwrite(self._head_fd, raw.ljust(_HEAD_SIZE - 1) + b"\n", 0)

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
        for name in ("_fd", "_head_fd"):
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
        pos = size
        chunk = b""
        # Read backwards until the chunk holds the last newline and the one before it.
        while True:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + chunk
            last_nl = chunk.rfind(b"\n")
            if last_nl >= 0:
                prev_nl = chunk.rfind(b"\n", 0, last_nl)
                if prev_nl >= 0 or pos == 0:
                    torn = chunk[last_nl + 1 :]
                    line = chunk[prev_nl + 1 : last_nl]
                    return line, torn, pos + last_nl + 1
            elif pos == 0:
                return None, chunk, 0


def _parse_head(raw: bytes, key: MacKey) -> tuple[int, str] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
        seq = obj["seq"]
        hash_hex = obj["hash"]
        mac = bytes.fromhex(obj["hmac"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(hash_hex, str):
        return None
    if not key.verify(head_message(seq, hash_hex), mac):
        return None
    return seq, hash_hex
