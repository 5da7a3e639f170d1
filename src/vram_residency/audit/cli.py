"""``vram-residency audit verify`` and ``audit show``: functions over parsed values.

An argparse front end can call :func:`verify_command` and :func:`show_command` directly, use
:func:`configure_parser` + :func:`run` on its own ``audit`` parser, or call :func:`register`
(the ``vram_residency.cli.main`` convention: add ``"vram_residency.audit.cli"`` to its commands).
The worker token is read from a file, never from the command line: argv is visible to every
user of the machine through ``ps`` and ``/proc``.

Exit codes: 0 verified (or shown); 1 the log has a break (tampering, or a torn record left by a
crash); 2 a usage problem (unreadable token file or log, bad token).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vram_residency.audit.files import chain_order
from vram_residency.audit.record import AuditKey
from vram_residency.audit.verify import iter_records, verify_log
from vram_residency.errors import ConfigError

__all__ = [
    "EXIT_BROKEN",
    "EXIT_OK",
    "EXIT_USAGE",
    "configure_parser",
    "read_token_file",
    "register",
    "run",
    "show_command",
    "verify_command",
]

EXIT_OK: Final = 0
EXIT_BROKEN: Final = 1
EXIT_USAGE: Final = 2


def read_token_file(path: str | os.PathLike[str], console: Console | None = None) -> bytes:
    """The token bytes in ``path``, without a trailing newline. Warns when others can read it."""
    p = Path(path)
    raw = p.read_bytes()
    if console is not None:
        try:
            mode = p.stat().st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode) and mode & 0o077:
            console.print(f"[yellow]warning:[/] token file {escape(str(p))} is readable by other users")
    return raw.rstrip(b"\r\n")


def verify_command(
    files: Sequence[str | os.PathLike[str]],
    token_file: str | os.PathLike[str],
    *,
    require_head: bool = False,
    console: Console | None = None,
) -> int:
    """``audit verify FILE... --token-file F``: check chain, hashes and HMACs of a log set."""
    out = console or Console()
    if not files:
        out.print("[red]error:[/] no log files given")
        return EXIT_USAGE
    try:
        key = AuditKey(read_token_file(token_file, out))
    except OSError as exc:
        out.print(
            f"[red]error:[/] cannot read token file {escape(str(token_file))}: {escape(str(exc.strerror))}"
        )
        return EXIT_USAGE
    except ConfigError as exc:
        out.print(f"[red]error:[/] bad token in {escape(str(token_file))}: {escape(str(exc))}")
        return EXIT_USAGE
    ordered = chain_order(files)
    report = verify_log(ordered, key, require_head=require_head)
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}")
    brk = report.first_break
    if brk is None:
        out.print(
            f"[green]OK[/]: {report.records} records in {len(ordered)} file(s) verify "
            f"(last seq {report.last_seq}, head {'checked' if report.head_checked else 'not checked'})"
        )
        return EXIT_OK
    seq = f", seq {brk.seq}" if brk.seq is not None else ""
    out.print(
        f"[red]BROKEN[/]: first broken record is index {brk.index} of {escape(brk.file)} "
        f"(position {brk.position} in the chain{seq}): {escape(brk.reason)}"
    )
    out.print(f"{report.records} record(s) before it verify.")
    if report.torn_tail:
        out.print("This is a torn last record from a crash; opening the log recovers it with a marker.")
    return EXIT_BROKEN


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
        return verify_command(args.files, args.token_file, require_head=args.require_head, console=console)
    if args.audit_command == "show":
        return show_command(args.files, event=args.event, shard=args.shard, console=console)
    raise ValueError(f"unknown audit command {args.audit_command!r}")
