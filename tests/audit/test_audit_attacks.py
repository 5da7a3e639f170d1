"""Attacks on real audit logs by someone WITHOUT the token: each tampering here must fail
``audit verify`` (or the library's ``verify_log``), with a clear reason and no raw exception.

Every log is written by the real :class:`AuditLog` (rotation included); the tampering is done on
the files afterwards, the way an intruder with write access to the state directory would."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from tests.audit.audit_helpers import TOKEN, write_token_file
from vram_residency.audit import VRAM_SEALED, AuditLog, rotated_paths, verify_log
from vram_residency.audit.cli import EXIT_BROKEN, EXIT_OK, verify_command


def _rotated_log(directory: Path, n: int = 40) -> Path:
    path = directory / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", max_bytes=2048, flush_interval=None) as log:
        for i in range(n):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
    assert len(rotated_paths(path)) >= 3
    return path


def _glob(directory: Path) -> list[str]:
    """What ``audit verify DIR/audit.jsonl*`` gets from the shell (the head file included)."""
    return sorted(str(p) for p in directory.iterdir() if p.name.startswith("audit.jsonl"))


def _verify(files: list[str], token_file: Path, **kw: object) -> tuple[int, str]:
    buf = io.StringIO()
    con = Console(file=buf, width=300, color_system=None)
    rc = verify_command(files, token_file, console=con, **kw)  # type: ignore[arg-type]
    return rc, buf.getvalue()


# ------------------------------------------------------------------ the newest segment removed


def test_deleting_the_active_file_with_its_head_kept_is_detected(tmp_path: Path) -> None:
    # The active file holds the newest records; the signed head names the last of them. With the
    # active file gone, the glob only finds rotated files: the head must still be compared.
    path = _rotated_log(tmp_path)
    token_file = write_token_file(tmp_path)
    assert _verify(_glob(tmp_path), token_file)[0] == EXIT_OK
    path.unlink()
    rc, out = _verify(_glob(tmp_path), token_file)
    assert rc == EXIT_BROKEN, out
    assert "signed head names seq 39" in out
    report = verify_log(rotated_paths(path), TOKEN)
    assert not report.ok and report.head_checked


def test_deleting_the_active_file_and_the_newest_rotated_file_is_detected(tmp_path: Path) -> None:
    path = _rotated_log(tmp_path)
    token_file = write_token_file(tmp_path)
    path.unlink()
    rotated_paths(path)[-1].unlink()
    rc, out = _verify(_glob(tmp_path), token_file)
    assert rc == EXIT_BROKEN, out
    assert "records were removed" in out


def test_rotated_set_without_any_head_warns_and_fails_with_require_head(tmp_path: Path) -> None:
    # Deleting the head as well is the documented limit: a warning, a break under --require-head.
    path = _rotated_log(tmp_path)
    token_file = write_token_file(tmp_path)
    path.unlink()
    Path(str(path) + ".head").unlink()
    rc, out = _verify(_glob(tmp_path), token_file)
    assert rc == EXIT_OK and "warning" in out and "no head file" in out
    rc, out = _verify(_glob(tmp_path), token_file, require_head=True)
    assert rc == EXIT_BROKEN and "no head file" in out and "audit.jsonl.head" in out


def test_crash_between_rotation_rename_and_new_active_file_still_verifies(tmp_path: Path) -> None:
    # The legitimate twin of the attack above: the rotation renamed the active file and the
    # process died before a record reached the new one. The head names the renamed file's last
    # record, so the set verifies, head checked.
    path = _rotated_log(tmp_path)
    token_file = write_token_file(tmp_path)
    n = len(rotated_paths(path))
    os.rename(path, tmp_path / f"audit.jsonl.{n + 1}")
    rc, out = _verify(_glob(tmp_path), token_file)
    assert rc == EXIT_OK, out
    assert "head checked" in out


# ------------------------------------------------------------------ a cut passed off as a crash


def _plain_log(directory: Path, n: int = 10) -> Path:
    path = directory / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        for i in range(n):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
    return path


def test_cutting_synced_records_mid_line_is_not_reported_as_a_crash(tmp_path: Path) -> None:
    # Records 5..9 were synced (the signed head names seq 9). Cutting the file in the middle of
    # record 5 leaves a "torn" last line; a crash can only tear a record after the head's, so this
    # is a removal, not a crash, and must not read as one (ok_until_torn, "torn ... from a crash").
    path = _plain_log(tmp_path)
    token_file = write_token_file(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]) + lines[5][:40])
    report = verify_log(path, TOKEN)
    assert not report.ok and not report.ok_until_torn and not report.torn_tail
    assert report.first_break is not None and "signed head names seq 9" in report.first_break.reason
    rc, out = _verify(_glob(tmp_path), token_file)
    assert rc == EXIT_BROKEN and "from a crash" not in out and "removed" in out


def test_cutting_anchored_records_mid_line_is_not_reported_as_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        for i in range(10):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
        anchor = log.signed_head()
    Path(str(path) + ".head").unlink()  # no head to help: the anchor alone must tell
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]) + lines[5][:40])
    report = verify_log(path, TOKEN, anchors=[anchor])
    assert not report.ok_until_torn and not report.torn_tail
    assert report.first_break is not None and "anchored head names seq 9" in report.first_break.reason


def test_a_real_torn_tail_after_the_head_is_still_a_crash(tmp_path: Path) -> None:
    # The legitimate case keeps its diagnosis: torn bytes after the head's record.
    path = _plain_log(tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"critical":false,"ev')
    report = verify_log(path, TOKEN)
    assert report.torn_tail and report.ok_until_torn and report.records == 10


# ------------------------------------------------------------------ huge lines


def test_a_huge_line_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    import tracemalloc

    from vram_residency.audit.record import MAX_LINE_BYTES

    path = _plain_log(tmp_path)
    token_file = write_token_file(tmp_path)
    with open(path, "ab") as f:  # three times the limit, then a newline and one more line
        for _ in range(3):
            f.write(b"x" * MAX_LINE_BYTES)
        f.write(b"\n{}\n")
    tracemalloc.start()
    try:
        report = verify_log(path, TOKEN)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.first_break is not None and "longer than" in report.first_break.reason
    assert report.records == 10 and not report.torn_tail
    assert peak < 3 * MAX_LINE_BYTES  # about one limit's worth, never the whole line
    rc, out = _verify(_glob(tmp_path), token_file)
    assert rc == EXIT_BROKEN and "longer than" in out


def test_the_writer_refuses_fields_a_reader_would_not_take(tmp_path: Path) -> None:
    from vram_residency.audit.record import MAX_FIELDS_CHARS
    from vram_residency.errors import InvalidInput

    with AuditLog(tmp_path / "audit.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        with pytest.raises(InvalidInput, match="too large"):
            log.emit(VRAM_SEALED, note="\u00e9" * MAX_FIELDS_CHARS)
        with pytest.raises(InvalidInput, match="too large"):  # the batch fast path too
            log.emit_many(VRAM_SEALED, [{"note": "a"}, {"note": "b" * MAX_FIELDS_CHARS}])
        assert log.next_seq == 0  # nothing appended
        log.emit(VRAM_SEALED, note="\u00e9" * 1000)
    assert verify_log(tmp_path / "audit.jsonl", TOKEN).ok
