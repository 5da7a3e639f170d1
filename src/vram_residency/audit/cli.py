"""``vram-residency audit verify`` and ``audit show``: functions over parsed values.

An argparse front end can call :func:`verify_command` and :func:`show_command` directly, use
:func:`configure_parser` + :func:`run` on its own ``audit`` parser, or call :func:`register`
(the ``vram_residency.cli.main`` convention: add ``"vram_residency.audit.cli"`` to its commands).
The worker token is read from a file, never from the command line: argv is visible to every
user of the machine through ``ps`` and ``/proc``. The file is read by
:func:`vram_residency._tokenfile.read_token_file`, the one reader every command uses.

File sets: ``audit verify ~/.local/state/vram-residency/audit.jsonl*`` must work as typed, so the
files given are sorted out first. Sidecars (``.head``, ``.torn-N``, a lock or temp file) are
skipped with a note; every log file is grouped with its rotation set (an active file given alone
brings its rotated files ``.1``, ``.2``...), and each set is verified on its own, with its head.

Worker ids: every tensor-parallel rank signs its own log with the one token, so one rank's
genuine log verifies as another's. ``--worker-id W`` fails unless every record is W's; without
it, the OK line names the worker id(s) the records carry, so a person sees a swapped log.

Exit codes: 0 verified (or shown); 1 the log has a break (tampering, a torn record left by a
crash, an ``AuditHeadMismatch`` record, an anchor it does not extend, a record of a worker other
than ``--worker-id``'s); 2 a usage problem (unreadable token file, anchor or log, bad token,
empty ``--worker-id``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vram_residency._regularfile import open_regular, read_regular
from vram_residency._strictjson import unique_keys
from vram_residency._tokenfile import read_token_file
from vram_residency.audit.files import chain_order, rotated_paths, split_rotation
from vram_residency.audit.record import AuditKey, SignedHead, signed_head_from_json
from vram_residency.audit.verify import VerifyReport, iter_records, quote_id, verify_log
from vram_residency.errors import ConfigError, InvalidInput

__all__ = [
    "EXIT_BROKEN",
    "EXIT_OK",
    "EXIT_USAGE",
    "configure_parser",
    "log_sets",
    "read_anchor",
    "register",
    "run",
    "show_command",
    "verify_command",
]

EXIT_OK: Final = 0
EXIT_BROKEN: Final = 1
EXIT_USAGE: Final = 2


#: A signed head (or a saved /worker/audit/head answer) is a few hundred bytes.
_MAX_ANCHOR_BYTES: Final = 64 << 10

#: Files that sit beside a log but are not one: the signed head, torn-tail sidecars, temp files.
_SIDECAR = re.compile(r"\.(head|lock|tmp)$|\.torn-[0-9]+(-[0-9a-f]+)?$")


def log_sets(files: Sequence[str | os.PathLike[str]]) -> tuple[list[list[Path]], list[Path]]:
    """Sort the files given into rotation sets, each in chain order; return (sets, skipped).

    Sidecars are skipped. An active file brings its existing rotated files, so that ``audit
    verify audit.jsonl`` checks the whole set, as does a shell glob.
    """
    skipped: list[Path] = []
    by_base: dict[Path, set[Path]] = {}
    for f in files:
        p = Path(f)
        if _SIDECAR.search(p.name):
            skipped.append(p)
            continue
        base, index = split_rotation(p)
        members = by_base.setdefault(base, set())
        members.add(p)
        if index is None:
            members.update(rotated_paths(p))
    return [chain_order(members) for _, members in sorted(by_base.items())], skipped


def read_anchor(text: str) -> SignedHead:
    """An anchor given as JSON text (``{"seq":..,"hash":..,"hmac":..}``) or as a file holding it
    (a saved head file, or a saved ``GET /worker/audit/head`` answer, whose ``head`` it takes)."""
    raw = text.strip()
    if not raw.startswith("{"):
        try:
            raw = read_regular(text, _MAX_ANCHOR_BYTES).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InvalidInput(f"cannot read anchor file {text}: {why}") from None
    try:
        # A key given twice is refused, as in audit lines and records: two readers of one anchor
        # must not see two different heads.
        twice = unique_keys(lambda k: InvalidInput(f"anchor gives {k!r} twice"))
        obj = json.loads(raw, object_pairs_hook=twice)
    except InvalidInput:
        raise
    except (ValueError, RecursionError):  # deep nesting: RecursionError
        raise InvalidInput("anchor is not JSON") from None
    if isinstance(obj, dict) and isinstance(obj.get("head"), dict):
        obj = obj["head"]
    head = signed_head_from_json(obj)
    if head is None:
        raise InvalidInput(
            'anchor must be a signed head: {"v":1,"seq":N,"hash":"<64 hex>","hmac":"<64 hex>"}'
        )
    return head


def verify_command(
    files: Sequence[str | os.PathLike[str]],
    token_file: str | os.PathLike[str],
    *,
    require_head: bool = False,
    anchors: Sequence[str] = (),
    worker_id: str | None = None,
    console: Console | None = None,
) -> int:
    """``audit verify FILE... --token-file F [--require-head] [--anchor HEAD]... [--worker-id W]``:
    check chain, hashes, HMACs, the signed head, any anchors and (with ``worker_id``) the
    records' worker id, of each log set given."""
    # No wrapping: a verdict is one line per finding, for people and for grep alike.
    out = console or Console(soft_wrap=True, highlight=False)
    if not files:
        out.print("[red]error:[/] no log files given")
        return EXIT_USAGE
    if worker_id is not None and not worker_id:
        out.print("[red]error:[/] --worker-id must not be empty (no worker has an empty id)")
        return EXIT_USAGE
    try:
        key = AuditKey(read_token_file(token_file))
    except ConfigError as exc:
        out.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    try:
        heads = [read_anchor(a) for a in anchors]
    except InvalidInput as exc:
        out.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    sets, skipped = log_sets(files)
    if skipped:
        names = ", ".join(p.name for p in skipped)
        out.print(f"skipped {len(skipped)} file(s) that are not logs: {escape(names)}")
    if not sets:
        out.print("[red]error:[/] no log files given (only head or sidecar files)")
        return EXIT_USAGE
    if heads and len(sets) > 1:
        out.print("[red]error:[/] --anchor needs exactly one log (rotation set) per call")
        return EXIT_USAGE
    rc = EXIT_OK
    for ordered in sets:
        rc = max(rc, _verify_set(ordered, key, require_head, heads, worker_id, out, named=len(sets) > 1))
    return rc


def _verify_set(
    ordered: list[Path],
    key: AuditKey,
    require_head: bool,
    heads: list[SignedHead],
    worker_id: str | None,
    out: Console,
    *,
    named: bool,
) -> int:
    for p in ordered:
        # A log that cannot be opened (missing, a directory, a FIFO or device) is a usage
        # problem, exit 2: verify_log would call it a break, the exit status of tampering.
        try:
            open_regular(p).close()
        except OSError as exc:
            why = "no such file" if isinstance(exc, FileNotFoundError) else str(exc.strerror)
            out.print(f"[red]error:[/] cannot read {escape(str(p))}: {escape(why)}")
            return EXIT_USAGE
    report = verify_log(ordered, key, require_head=require_head, anchors=heads, worker_id=worker_id)
    label = f"{escape(str(ordered[-1]))}: " if named else ""
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {label}{escape(w)}")
    if len(report.worker_ids) > 1:
        # Legitimate (a worker reopened its log under a new id) or a swap: a person must look.
        out.print(
            f"[yellow]warning:[/] {label}records of more than one worker in this log ({_ids(report)}); "
            "--worker-id W requires one"
        )
    brk = report.first_break
    if brk is None and not report.alarms:
        anchored = f", {report.anchors_checked} anchor(s) extended" if heads else ""
        checked = "checked" if report.head_checked else "not checked"
        required = " as required" if worker_id is not None and report.worker_ids else ""
        out.print(
            f"{label}[green]OK[/]: {report.records} records in {len(ordered)} file(s) verify "
            f"({_ids(report)}{required}; last seq {report.last_seq}, head {checked}{anchored})"
        )
        return EXIT_OK
    for alarm in report.alarms:
        out.print(
            f"{label}[red]TAMPERED[/]: record seq {alarm.seq} (index {alarm.index} of {escape(alarm.file)}) "
            f"is an AuditHeadMismatch: {escape(alarm.reason)}"
        )
    if brk is not None and brk.kind != "record":
        # Refused before any record was read: no record is "first broken", none was checked.
        what = f"the head file {escape(brk.file)}" if brk.kind == "head" else f"anchor {brk.index}"
        out.print(f"{label}[red]BROKEN[/]: {what}: {escape(brk.reason)}")
        out.print("No record was checked.")
    elif brk is not None:
        seq = f", seq {brk.seq}" if brk.seq is not None else ""
        out.print(
            f"{label}[red]BROKEN[/]: first broken record is index {brk.index} of {escape(brk.file)} "
            f"(position {brk.position} in the chain{seq}): {escape(brk.reason)}"
        )
        out.print(f"{report.records} record(s) before it verify.")
        if report.torn_tail:
            out.print("This is a torn last record from a crash; opening the log recovers it with a marker.")
    return EXIT_BROKEN


#: How many worker ids a summary names; the rest are counted.
_MAX_IDS_SHOWN: Final = 5


def _ids(report: VerifyReport) -> str:
    """The worker ids a report saw, for a one-line summary (escaped for rich markup too)."""
    ids = report.worker_ids
    if not ids:
        return "no worker_id: no records"
    if len(ids) == 1:
        return f"worker_id {escape(quote_id(ids[0]))}"
    shown = ", ".join(escape(quote_id(w)) for w in ids[:_MAX_IDS_SHOWN])
    more = f" and {len(ids) - _MAX_IDS_SHOWN} more" if len(ids) > _MAX_IDS_SHOWN else ""
    return f"{len(ids)} worker ids: {shown}{more}"


def _details(fields: dict[str, Any], skip: frozenset[str]) -> str:
    parts = []
    for k in sorted(fields):
        if k in skip:
            continue
        v = fields[k]
        text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
        if len(text) > 80:
            text = text[:77] + "..."
        parts.append(f"{k}={text}")
    return " ".join(parts)


def show_command(
    files: Sequence[str | os.PathLike[str]],
    *,
    event: str | None = None,
    shard: str | None = None,
    console: Console | None = None,
) -> int:
    """``audit show FILE... [--event TYPE] [--shard ID]``: a readable table (not a verification)."""
    out = console or Console()
    if not files:
        out.print("[red]error:[/] no log files given")
        return EXIT_USAGE
    table = Table(title="audit records", caption="not verified: use `audit verify` for that")
    for col in ("seq", "time (UTC)", "event", "crit", "worker", "shard", "details"):
        table.add_column(col, overflow="fold")
    shown = bad = 0
    try:
        for path, index, rec in iter_records(chain_order(files)):
            if rec is None:
                bad += 1
                out.print(f"[yellow]warning:[/] {escape(str(path))} line {index} is not a record")
                continue
            if event is not None and rec.event != event:
                continue
            rec_shard = rec.fields.get("shard_id")
            if shard is not None and rec_shard != shard:
                continue
            table.add_row(
                str(rec.seq),
                rec.time.replace("T", " ").rstrip("Z"),
                f"[bold red]{escape(rec.event)}[/]" if rec.critical else escape(rec.event),
                "yes" if rec.critical else "",
                escape(rec.worker_id),
                escape(str(rec_shard)) if rec_shard is not None else "",
                escape(_details(dict(rec.fields), frozenset({"shard_id"}))),
            )
            shown += 1
    except OSError as exc:
        out.print(f"[red]error:[/] cannot read {escape(str(exc.filename))}: {escape(str(exc.strerror))}")
        return EXIT_USAGE
    out.print(table)
    out.print(f"{shown} record(s) shown" + (f", {bad} unreadable line(s)" if bad else ""))
    return EXIT_OK


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``verify`` and ``show`` subcommands to an ``audit`` parser; dispatch with :func:`run`."""
    sub = parser.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser("verify", help="check chain links, hashes and HMACs of an audit log")
    v.add_argument("files", nargs="+", metavar="FILE", help="log files (a rotation set in any order)")
    v.add_argument("--token-file", required=True, help="file holding the worker token")
    v.add_argument("--require-head", action="store_true", help="fail when the signed head file is missing")
    v.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="HEAD",
        help="a signed head kept outside the worker (JSON text or a file, e.g. a saved "
        "GET /worker/audit/head answer): fail unless the log contains and extends it; repeatable",
    )
    v.add_argument(
        "--worker-id",
        metavar="W",
        help="fail unless every record was written by worker W (every tensor-parallel rank signs "
        "its log with the one token: without this, one rank's log passes as another's)",
    )
    s = sub.add_parser("show", help="print audit records as a table")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--event", metavar="TYPE", help="only this event type")
    s.add_argument("--shard", metavar="ID", help="only events of this shard")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` (with ``verify`` and ``show``) in the ``vram_residency.cli.main`` style:
    list ``"vram_residency.audit.cli"`` in its ``_COMMANDS`` and ``args.func(args)`` runs it."""
    parser = subparsers.add_parser("audit", help="verify or show an audit log")
    configure_parser(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    if args.audit_command == "verify":
        return verify_command(
            args.files,
            args.token_file,
            require_head=args.require_head,
            anchors=args.anchor,
            worker_id=args.worker_id,
            console=console,
        )
    if args.audit_command == "show":
        return show_command(args.files, event=args.event, shard=args.shard, console=console)
    raise ValueError(f"unknown audit command {args.audit_command!r}")
