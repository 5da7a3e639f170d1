"""Offline verification of an audit log (one file or a rotation set).

Checks, record by record in chain order: the line is complete and well formed; its ``hash`` is
the SHA-256 of its canonical body; its ``hmac`` verifies under the audit key of the given token;
its ``prev_hash`` is the previous record's hash (``GENESIS_HASH`` for the very first); its
``seq`` is one more than the previous one. The first failure is reported with the file, the
record's index in that file (0-based line number), its position in the whole set, and a reason.

What each check catches: an **edited** record fails its hash (or its HMAC, if the editor
recomputed the hash); a **deleted**, **reordered** or **inserted** record breaks the next link
(an inserted record forged with the right links fails its HMAC); a record signed with **another
token** fails its HMAC. Records cut from the **end** leave no broken link; the signed head file
catches that (the log must reach the head's ``(seq, hash)``), as long as the head file itself is
there. A missing head is reported as a warning, or as a break with ``require_head=True``.

Only the exact canonical bytes of each record verify (``record.parse_line``): duplicate keys,
extra whitespace, needless ``\\u`` escapes and CRLF line ends are breaks.

Tamper evidence the writer left: an ``AuditHeadMismatch`` record (written when a restart found
the head missing or behind the log) verifies as a record, but is reported in
:attr:`VerifyReport.alarms`, and the report is not ``ok``: a restart cannot turn a log with
removed records back into one that verifies clean.

Anchors: a signed head kept *outside* the worker (``AuditLog.signed_head()``, served at
``GET /worker/audit/head``). ``verify_log(..., anchors=[head])`` fails unless the log holds that
very record (same seq and hash) and so extends it. What no check here can detect without an
anchor: cutting records from the end *and* putting back an older genuine head file (a rollback
to any earlier synced state); deleting the whole log and its head (it looks like a new worker);
replacing the log set with another genuine log of the same token (unless ``worker_id=`` is
given and the other log is another worker's: see below); non-critical records still
buffered (at most ``flush_interval`` seconds of them) when the process was killed; and anything
done by someone who holds the token, who can sign whatever they like.

Worker ids: every record's signed body holds its writer's ``worker_id``, but the head does not
(it signs only ``(seq, hash)``), and every tensor-parallel rank signs its own log with the one
group token, so rank 1's genuine log verifies as well as rank 0's. ``worker_id=W`` holds the
log to one worker: the first record (whose hash and HMAC verify) with another id is a break.
An anchor binds the worker too, through the hashes: the record it names covers ``worker_id``
and links back to every earlier one. :attr:`VerifyReport.worker_ids` lists the ids seen, so a
caller without either can still show them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vram_residency._regularfile import open_regular, read_regular
from vram_residency.audit.events import AUDIT_HEAD_MISMATCH
from vram_residency.audit.files import default_head_path, split_rotation
from vram_residency.audit.record import (
    GENESIS_HASH,
    MAX_LINE_BYTES,
    AuditRecord,
    MacKey,
    RecordFormatError,
    SignedHead,
    audit_key,
    check_record,
    parse_line,
    parse_signed_head,
)
from vram_residency.errors import InvalidInput

__all__ = ["VerifyBreak", "VerifyReport", "iter_records", "verify_log"]

TORN_REASON = "torn record: the last line is incomplete (a crash during a write)"


@dataclass(frozen=True, slots=True)
class VerifyBreak:
    """The first record that failed verification."""

    file: str
    index: int  # 0-based record (line) index within ``file``
    position: int  # 0-based index across the whole set, in chain order
    reason: str
    seq: int | None = None  # the record's own seq, when it could be parsed
    record_id: str | None = None
    #: What broke: a record of the log, or, before any record was read, the head file (missing
    #: under require_head, unreadable or not signed) or an anchor (not signed by this key).
    kind: Literal["record", "head", "anchor"] = "record"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    files: tuple[str, ...]
    records: int  # records that verified before the first break (all of them when ok)
    last_seq: int | None
    last_hash: str
    first_break: VerifyBreak | None
    torn_tail: bool  # the break is a torn last line of the last file, i.e. a crash
    head_checked: bool
    warnings: tuple[str, ...] = field(default=())
    #: Verified records that are themselves evidence of tampering (``AuditHeadMismatch``).
    alarms: tuple[VerifyBreak, ...] = field(default=())
    #: How many anchors were given and found in the log (all of them, when ok).
    anchors_checked: int = 0
    #: The distinct ``worker_id``s of the records that verified, in order of first appearance
    #: (one, for a log one worker wrote; none for an empty log).
    worker_ids: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.first_break is None and not self.alarms

    @property
    def ok_until_torn(self) -> bool:
        """Everything verifies, except possibly a torn last record left by a crash."""
        return (self.first_break is None or self.torn_tail) and not self.alarms


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path``; one longer than ``MAX_LINE_BYTES`` comes as its first
    ``MAX_LINE_BYTES + 1`` bytes (no record is that long), the rest of it is skipped unread."""
    # Regular files only: a FIFO in a glob would block, /dev/zero is one endless line.
    with open_regular(path) as f:
        while line := f.readline(MAX_LINE_BYTES + 1):
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
            yield line


def iter_records(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[Path, int, AuditRecord | None]]:
    """Parse records without verifying them (for ``audit show``): (file, index, record or None
    for a line that is not a record)."""
    for p in paths:
        path = Path(p)
        for index, line in enumerate(_lines(path)):
            if len(line) > MAX_LINE_BYTES:
                yield path, index, None
                continue
            try:
                rec, _ = parse_line(line.rstrip(b"\n"))
            except RecordFormatError:
                yield path, index, None
                continue
            yield path, index, rec


#: A signed head is one short JSON line; anything much longer is not one.
_MAX_HEAD_BYTES = 64 << 10


def _read_head(path: Path, key: MacKey) -> tuple[tuple[int, str] | None, str | None]:
    """((seq, hash) or None, problem or None). An empty or missing head is (None, None)."""
    try:
        raw = read_regular(path, _MAX_HEAD_BYTES).strip()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"head file {path} unreadable: {exc.strerror}"
    if not raw:
        return None, None
    head = parse_signed_head(raw, key)
    if head is None:
        return None, f"head file {path} is malformed or not signed by this token's audit key"
    return (head.seq, head.hash), None


def verify_log(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    token: str | bytes | MacKey,
    *,
    head: str | os.PathLike[str] | Literal["auto"] | None = "auto",
    require_head: bool = False,
    require_genesis: bool = True,
    anchors: Iterable[SignedHead] = (),
    worker_id: str | None = None,
) -> VerifyReport:
    """Verify a log or a rotation set given in chain order (see ``files.chain_order``).

    ``token`` is the worker token (or its audit key). ``head="auto"`` uses ``<active>.head``
    of the last path's set (``audit.jsonl.3`` -> ``audit.jsonl.head``), so a set whose active
    file was deleted is still held to its head; ``None`` skips the head.
    ``require_genesis=False`` verifies a set whose older files were archived away: the first
    record may then link to any hash. ``anchors`` are signed heads kept outside the worker:
    each must be signed by this token and name a record the files given contain (same seq and
    hash), or the report has a break. ``worker_id``: every record must carry this id, or the
    first that does not is a break (another worker's log, or its records spliced in).
    """
    if worker_id is not None and (not isinstance(worker_id, str) or not worker_id):
        # An empty id matches no record an AuditLog writes (it refuses one): a caller's mistake,
        # not a verdict on the log.
        raise InvalidInput("worker_id must be a non-empty string (or None to accept any)")
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    key = audit_key(token)
    warnings: list[str] = []
    alarms: list[VerifyBreak] = []
    anchor_list = list(anchors)
    anchors_seen: set[int] = set()
    anchor_at: dict[int, list[SignedHead]] = {}
    # A dict keeps first-appearance order; a log one worker wrote adds one key.
    seen_ids: dict[str, None] = {}
    for a in anchor_list:
        anchor_at.setdefault(a.seq, []).append(a)

    head_path: Path | None
    if head == "auto":
        # The head of the set's active file, even when the files given end with a rotated one:
        # deleting the active file (the newest records) must not also switch the head check off.
        # A legitimate set ending in a rotated file (a crash between a rotation's rename and the
        # next write) reaches the head's record all the same.
        head_path = default_head_path(split_rotation(files[-1])[0]) if files else None
    elif head is None:
        head_path = None
    else:
        head_path = Path(head)

    head_val: tuple[int, str] | None = None
    head_problem: str | None = None
    if head_path is not None:
        head_val, head_problem = _read_head(head_path, key)
        if head_val is None and head_problem is None:
            msg = f"no head file at {head_path}: records cut from the end of the log cannot be detected"
            if require_head:
                head_problem = msg
            else:
                warnings.append(msg)
    elif require_head:
        head_problem = "no head file given: records cut from the end of the log cannot be detected"

    prev_hash: str | None = GENESIS_HASH if require_genesis else None
    prev_seq: int | None = None
    position = 0
    good = 0
    head_seen = False
    last_file = files[-1] if files else None

    def report(brk: VerifyBreak | None, torn: bool = False) -> VerifyReport:
        return VerifyReport(
            files=tuple(str(f) for f in files),
            records=good,
            last_seq=prev_seq,
            last_hash=prev_hash if prev_hash is not None else GENESIS_HASH,
            first_break=brk,
            torn_tail=torn,
            head_checked=head_val is not None,
            warnings=tuple(warnings),
            alarms=tuple(alarms),
            anchors_checked=len(anchors_seen),
            worker_ids=tuple(seen_ids),
        )

    def removed_past(at: int) -> str | None:
        """Why the log must once have held a record past seq ``at`` (an anchor or the signed
        head names one), or None."""
        for a in anchor_list:
            if a.seq > at:
                return (
                    f"the log ends at seq {at} but an anchored head names seq {a.seq}: records were "
                    "removed (a rollback to an earlier state)"
                )
        if head_val is not None and head_val[0] > at:
            return (
                f"the log ends at seq {at} but the signed head names seq {head_val[0]}: "
                "records were removed from the end"
            )
        return None

    if head_problem is not None:
        # A head that is present but forged or unreadable is itself evidence of tampering.
        return report(
            VerifyBreak(file=str(head_path or ""), index=0, position=0, reason=head_problem, kind="head")
        )
    for i, a in enumerate(anchor_list):
        if not a.verify(key):
            return report(
                VerifyBreak(
                    file="",
                    index=i,
                    position=0,
                    reason=f"anchor {i} is not signed by this token's audit key",
                    kind="anchor",
                )
            )

    for path in files:
        try:
            for index, line in enumerate(_lines(path)):
                seq: int | None = None
                rid: str | None = None
                reason: str | None = None
                torn = False
                if len(line) > MAX_LINE_BYTES:
                    reason = f"line longer than {MAX_LINE_BYTES} bytes: not a record (no writer's is)"
                elif not line.endswith(b"\n"):
                    reason, torn = TORN_REASON, path == last_file
                    cut = removed_past(prev_seq if prev_seq is not None else -1) if torn else None
                    if cut is not None:
                        # A crash tears only a record after the newest synced one, which the
                        # head (and any anchor) names: this file was cut, not torn by a crash.
                        reason, torn = f"{cut}; its last line is cut short, which no crash leaves", False
                else:
                    try:
                        rec, canon = parse_line(line[:-1])
                    except RecordFormatError as exc:
                        reason = f"malformed record: {exc}"
                    else:
                        seq, rid = rec.seq, rec.id
                        reason = _check(key, rec, canon, prev_hash, prev_seq, require_genesis)
                        # After the signature and links: an edited id is reported as tampering,
                        # a genuine record of another worker as what it is.
                        if reason is None and worker_id is not None and rec.worker_id != worker_id:
                            reason = (
                                f"worker_id {quote_id(rec.worker_id)} where {quote_id(worker_id)} was "
                                "expected: another worker's log, or its records spliced in"
                            )
                        if reason is None and head_val is not None and rec.seq == head_val[0]:
                            if rec.hash != head_val[1]:
                                reason = "record differs from the one the signed head names"
                            head_seen = True
                        if reason is None and rec.seq in anchor_at:
                            if any(a.hash != rec.hash for a in anchor_at[rec.seq]):
                                reason = "record differs from the one an anchored head names"
                            anchors_seen.add(rec.seq)
                if reason is not None:
                    where = VerifyBreak(
                        file=str(path), index=index, position=position, reason=reason, seq=seq, record_id=rid
                    )
                    return report(where, torn=torn)
                if rec.event == AUDIT_HEAD_MISMATCH:
                    alarms.append(
                        VerifyBreak(
                            file=str(path),
                            index=index,
                            position=position,
                            reason="the writer found its head missing or behind the log at a restart "
                            f"(records may have been removed): {rec.fields.get('message', '')}",
                            seq=rec.seq,
                            record_id=rec.id,
                        )
                    )
                prev_hash, prev_seq = rec.hash, rec.seq
                seen_ids.setdefault(rec.worker_id, None)
                position += 1
                good += 1
        except OSError as exc:
            return report(
                VerifyBreak(
                    file=str(path), index=0, position=position, reason=f"file unreadable: {exc.strerror}"
                )
            )

    at = prev_seq if prev_seq is not None else -1
    for a in anchor_list:
        if a.seq == -1 or a.seq in anchors_seen:
            anchors_seen.add(a.seq)  # an empty log's head is extended by any log
            continue
        why = (
            f"the log ends at seq {at} but an anchored head names seq {a.seq}: records were removed "
            "(a rollback to an earlier state)"
            if a.seq > at
            else f"the anchored record seq {a.seq} is not in the files given"
        )
        return report(
            VerifyBreak(
                file=str(last_file) if last_file is not None else "",
                index=_count_lines(last_file) if last_file is not None else 0,
                position=position,
                reason=why,
            )
        )
    if head_val is not None and not head_seen and head_val[0] >= 0:
        head_seq = head_val[0]
        if prev_seq is None or prev_seq < head_seq:
            end = str(last_file) if last_file is not None else ""
            return report(
                VerifyBreak(
                    file=end,
                    index=_count_lines(last_file) if last_file is not None else 0,
                    position=position,
                    reason=(
                        f"the log ends at seq {at} but the signed head names seq {head_seq}: "
                        "records were removed from the end"
                    ),
                )
            )
        # The head names a record before the files given (a partial set): nothing to compare.
        warnings.append("the signed head names a record outside the files given; not compared")
    return report(None)


def _check(
    key: MacKey,
    rec: AuditRecord,
    canon: bytes,
    prev_hash: str | None,
    prev_seq: int | None,
    require_genesis: bool,
) -> str | None:
    """Why one parsed record fails (own hash and HMAC first, then its links), or None."""
    problem = check_record(key, rec, canon)
    if problem is not None:
        return problem
    if prev_hash is not None and rec.prev_hash != prev_hash:
        if prev_seq is None:
            return "the first record does not link to the genesis hash (are older rotated files missing?)"
        return (
            "broken link: prev_hash is not the previous record's hash "
            "(a record was deleted, reordered or inserted here)"
        )
    if prev_seq is not None and rec.seq != prev_seq + 1:
        return f"seq {rec.seq} where {prev_seq + 1} was expected"
    if prev_seq is None and require_genesis and rec.seq != 0:
        return f"the first record has seq {rec.seq}, not 0"
    return None


#: How much of a worker id a message shows: ids are any non-empty string, a verdict is one line.
_MAX_SHOWN_ID = 120


def quote_id(worker_id: str) -> str:
    """A worker id for a one-line message: quoted, control and invisible characters escaped
    (``repr``), long ones shortened."""
    shown = repr(worker_id)
    return shown if len(shown) <= _MAX_SHOWN_ID else shown[: _MAX_SHOWN_ID - 4] + "..." + shown[0]


def _count_lines(path: Path) -> int:
    try:
        with open_regular(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
