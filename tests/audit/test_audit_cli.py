"""audit verify / audit show command functions, and how the files given (a shell glob) are sorted
into rotation sets with their sidecars skipped."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from rich.console import Console

from tests.audit.audit_helpers import OTHER_TOKEN, TOKEN, read_lines, run_cli, write_records
from vram_residency.audit import (
    SEAL_VERIFICATION_FAILED,
    VRAM_ALLOCATED,
    VRAM_SEALED,
    AuditLog,
    rotated_paths,
)
from vram_residency.audit.cli import (
    EXIT_BROKEN,
    EXIT_OK,
    EXIT_USAGE,
    configure_parser,
    log_sets,
    run,
    show_command,
    verify_command,
)


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


@pytest.fixture
def logged(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w-1", max_bytes=2048) as log:
        for i in range(30):
            log.emit(VRAM_SEALED, shard_id=f"shard-{i % 3}", vram_bytes=4096)
        log.emit(
            SEAL_VERIFICATION_FAILED,
            shard_id="shard-1",
            expected_digest="a" * 64,
            actual_digest="b" * 64,
            corrupted_ranges=[[0, 4096]],
        )
        log.emit(VRAM_ALLOCATED, shard_id="shard-2", vram_bytes=1)
    return path


def _set(path: Path) -> list[str]:
    # Deliberately in shell-glob (lexical) order: the command sorts them into chain order.
    return sorted(str(p) for p in [*rotated_paths(path), path])


def test_verify_ok(logged: Path, token_file: Path) -> None:
    con, buf = _console()
    assert verify_command(_set(logged), token_file, console=con) == EXIT_OK
    out = buf.getvalue()
    assert "OK" in out and "32 records" in out
    assert TOKEN not in out


def test_verify_reports_first_break(logged: Path, token_file: Path) -> None:
    lines = read_lines(logged)
    lines[1] = lines[1].replace(b"shard-", b"shard_")
    logged.write_bytes(b"".join(lines))
    con, buf = _console()
    assert verify_command(_set(logged), token_file, console=con) == EXIT_BROKEN
    out = buf.getvalue()
    assert "BROKEN" in out and "index 1 of" in out and "hash mismatch" in out


def test_verify_with_wrong_token(logged: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text(OTHER_TOKEN)
    other.chmod(0o600)
    con, buf = _console()
    assert verify_command(_set(logged), other, console=con) == EXIT_BROKEN
    assert OTHER_TOKEN not in buf.getvalue()


def test_verify_torn_tail_says_so(logged: Path, token_file: Path) -> None:
    with open(logged, "ab") as f:
        f.write(b'{"critical":')
    con, buf = _console()
    assert verify_command(_set(logged), token_file, console=con) == EXIT_BROKEN
    assert "torn" in buf.getvalue()


def test_verify_usage_errors(logged: Path, tmp_path: Path) -> None:
    con, buf = _console()
    assert verify_command(_set(logged), tmp_path / "nope", console=con) == EXIT_USAGE
    short = tmp_path / "short"
    short.write_text("abc")
    assert verify_command(_set(logged), short, console=con) == EXIT_USAGE
    assert verify_command([], short, console=con) == EXIT_USAGE
    assert "abc" not in buf.getvalue()  # the bad token is not echoed


def test_verify_refuses_a_readable_token_file(logged: Path, token_file: Path) -> None:
    # One policy for every command (vram_residency._tokenfile): a token others can read is refused.
    token_file.chmod(0o644)
    con, buf = _console()
    assert verify_command(_set(logged), token_file, console=con) == EXIT_USAGE
    assert "chmod 600" in buf.getvalue()


def test_verify_require_head(logged: Path, token_file: Path) -> None:
    Path(str(logged) + ".head").unlink()
    con, buf = _console()
    assert verify_command(_set(logged), token_file, console=con) == EXIT_OK
    assert "warning" in buf.getvalue()
    con, buf = _console()
    assert verify_command(_set(logged), token_file, require_head=True, console=con) == EXIT_BROKEN
    # Refused for the head before any record was read: said so, not "first broken record is
    # index 0 of audit.jsonl.head ... 0 record(s) before it verify".
    text = buf.getvalue()
    assert "BROKEN: the head file" in text and "no head file at" in text, text
    assert "No record was checked." in text and "first broken record" not in text, text
    Path(str(logged) + ".head").write_bytes(b"")  # an empty head counts as a missing one
    con, buf = _console()
    assert verify_command(_set(logged), token_file, require_head=True, console=con) == EXIT_BROKEN
    assert "BROKEN: the head file" in buf.getvalue() and "No record was checked." in buf.getvalue()


def test_show_table_and_filters(logged: Path) -> None:
    con, buf = _console()
    assert show_command(_set(logged), console=con) == EXIT_OK
    assert "32 record(s) shown" in buf.getvalue()

    con, buf = _console()
    assert show_command(_set(logged), event=SEAL_VERIFICATION_FAILED, console=con) == EXIT_OK
    out = buf.getvalue()
    assert "1 record(s) shown" in out and "shard-1" in out and "corrupted_ranges=[[0,4096]]" in out

    con, buf = _console()
    assert show_command(_set(logged), shard="shard-2", console=con) == EXIT_OK
    assert "11 record(s) shown" in buf.getvalue()

    con, buf = _console()
    assert show_command(_set(logged), event=VRAM_SEALED, shard="shard-0", console=con) == EXIT_OK
    assert "10 record(s) shown" in buf.getvalue()


def test_show_tolerates_bad_lines(logged: Path) -> None:
    with open(logged, "ab") as f:
        f.write(b"garbage\n")
    con, buf = _console()
    assert show_command([str(logged)], console=con) == EXIT_OK
    assert "not a record" in buf.getvalue()
    con, buf = _console()
    assert show_command([str(logged.with_name("missing"))], console=con) == EXIT_USAGE


def test_argparse_wiring(logged: Path, token_file: Path) -> None:
    parser = argparse.ArgumentParser(prog="vram-residency audit")
    configure_parser(parser)
    con, buf = _console()
    args = parser.parse_args(["verify", *_set(logged), "--token-file", str(token_file)])
    assert run(args, console=con) == EXIT_OK
    args = parser.parse_args(["show", str(logged), "--event", "VramAllocated", "--shard", "shard-2"])
    assert run(args, console=con) == EXIT_OK
    assert "1 record(s) shown" in buf.getvalue()
    with pytest.raises(SystemExit):
        parser.parse_args(["verify", str(logged)])  # the token file is required, never argv


def test_register_in_the_main_cli_style(logged: Path, token_file: Path) -> None:
    from vram_residency.audit.cli import register

    parser = argparse.ArgumentParser(prog="vram-residency")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify", *_set(logged), "--token-file", str(token_file)])
    assert args.func(args) == EXIT_OK


def test_log_sets_skip_sidecars_and_find_rotations(tmp_path: Path, token_file: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 40, max_bytes=2048)
    (tmp_path / "audit.jsonl.torn-7").write_bytes(b'{"crit')
    glob = sorted(tmp_path.glob("audit.jsonl*"))
    sets, skipped = log_sets(glob)
    assert {p.name for p in skipped} == {"audit.jsonl.head", "audit.jsonl.torn-7"}
    assert len(sets) == 1 and sets[0][-1] == path and len(sets[0]) > 2
    assert log_sets([path])[0] == sets  # the active file alone brings its rotation set
    res = run_cli("audit", "verify", *glob, "--require-head", "--token-file", token_file)
    assert res.returncode == EXIT_OK and "skipped 2" in res.stdout, res.stdout + res.stderr
