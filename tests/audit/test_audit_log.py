"""AuditLog: record format, durability classes, rotation, recovery, head, fail-closed.

A restart after records were cut (head deleted, emptied, kept or foreign) records the mismatch
instead of laundering it; every I/O error on the audit path (injected, or a real fd or file-size
limit) and a dying flusher fail closed with an AuditWriteFailed that names the lost event."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.audit.audit_helpers import OTHER_TOKEN, TOKEN, read_lines, records, run_cli, write_records
from vram_residency.audit import (
    AUDIT_HEAD_MISMATCH,
    CRITICAL_EVENTS,
    GENESIS_HASH,
    LOG_RECOVERED,
    POLICY_VIOLATION,
    SEAL_VERIFICATION_FAILED,
    SECURITY_INCIDENT,
    VRAM_SEALED,
    AuditHeadMismatch,
    AuditLog,
    AuditLogCorrupt,
    AuditWriteFailed,
    canonical_bytes,
    chain_order,
    error_fields,
    rotated_paths,
    verify_log,
)
from vram_residency.audit import log as log_module
from vram_residency.audit.cli import EXIT_BROKEN
from vram_residency.audit.files import default_head_path
from vram_residency.audit.record import RECORD_DOMAIN
from vram_residency.errors import ConfigError, InvalidInput, SealVerificationFailed
from vram_residency.formats.keys import AUDIT_KEY_INFO, SEAL_KEY_INFO, SecretKey


def _all_files(path: Path) -> list[Path]:
    return [*rotated_paths(path), path]


# ---------------------------------------------------------------------------- record format


def test_record_fields_hash_and_hmac_follow_the_spec(audit_log: AuditLog, log_path: Path) -> None:
    rec = audit_log.emit(VRAM_SEALED, shard_id="s0", vram_bytes=4096, digest="ab" * 32)
    audit_log.flush()
    (obj,) = records(log_path)
    assert obj["seq"] == 0 and obj["prev_hash"] == GENESIS_HASH
    assert obj["event"] == "VramSealed" and obj["worker_id"] == "w-test" and obj["critical"] is False
    assert obj["fields"] == {"shard_id": "s0", "vram_bytes": 4096, "digest": "ab" * 32}
    assert obj["time"].endswith("Z") and "T" in obj["time"]
    assert len(obj["id"]) == 32 and obj["id"] == rec.id
    body = {k: v for k, v in obj.items() if k not in ("hash", "hmac")}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canon == canonical_bytes(body)
    assert obj["hash"] == hashlib.sha256(canon).hexdigest() == rec.hash
    # The audit key is HKDF(token, AUDIT_KEY_INFO), distinct from the seal key.
    audit_key = SecretKey.from_token(TOKEN, AUDIT_KEY_INFO)
    assert audit_key.verify(RECORD_DOMAIN + canon, bytes.fromhex(obj["hmac"]))
    assert not SecretKey.from_token(TOKEN, SEAL_KEY_INFO).verify(
        RECORD_DOMAIN + canon, bytes.fromhex(obj["hmac"])
    )


def test_chain_links_every_record_to_the_previous(audit_log: AuditLog, log_path: Path) -> None:
    for i in range(20):
        audit_log.emit(VRAM_SEALED, shard_id=f"s{i}")
    audit_log.flush()
    objs = records(log_path)
    assert [o["seq"] for o in objs] == list(range(20))
    for a, b in itertools.pairwise(objs):
        assert b["prev_hash"] == a["hash"]
    assert verify_log(log_path, TOKEN).ok


def test_critical_defaults_by_event_type(audit_log: AuditLog) -> None:
    for name in (SEAL_VERIFICATION_FAILED, POLICY_VIOLATION, SECURITY_INCIDENT, "IntegrityViolation"):
        assert name in CRITICAL_EVENTS
        assert audit_log.emit(name, shard_id="s").critical is True
    assert audit_log.emit(VRAM_SEALED).critical is False
    assert audit_log.emit(VRAM_SEALED, critical=True).critical is True
    assert audit_log.emit(SEAL_VERIFICATION_FAILED, critical=False).critical is False
    assert audit_log.emit("ShardRepairedLater", shard_id="s").critical is False  # new names allowed


def test_critical_event_is_on_disk_when_emit_returns(audit_log: AuditLog, log_path: Path) -> None:
    audit_log.emit(VRAM_SEALED, shard_id="batched")
    assert log_path.read_bytes() == b""  # non-critical: still in the batch buffer
    rec = audit_log.emit(SEAL_VERIFICATION_FAILED, shard_id="bad", expected_digest="0" * 64)
    objs = records(log_path)  # written in chain order, the batched one first
    assert [o["id"] for o in objs][-1] == rec.id and objs[0]["fields"]["shard_id"] == "batched"


def test_critical_event_is_synced(monkeypatch: pytest.MonkeyPatch, audit_log: AuditLog) -> None:
    synced: list[int] = []
    real = log_module._datasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(log_module, "_datasync", counting)
    audit_log.emit(VRAM_SEALED)
    assert synced == []
    audit_log.emit(POLICY_VIOLATION, shard_id="s", message="managed memory")
    assert len(synced) == 1


def test_batch_written_when_buffer_fills(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w", batch_bytes=2048, flush_interval=None) as log:
        for i in range(40):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
        on_disk = len(records(log_path))
        assert 0 < on_disk < 40
    assert len(records(log_path)) == 40


def test_background_flush_by_time(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w", flush_interval=0.02) as log:
        log.emit(VRAM_SEALED)
        deadline = time.monotonic() + 5
        while not records(log_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(records(log_path)) == 1


def test_close_flushes_and_is_idempotent(audit_log: AuditLog, log_path: Path) -> None:
    for _ in range(5):
        audit_log.emit(VRAM_SEALED)
    audit_log.close()
    audit_log.close()
    assert len(records(log_path)) == 5
    with pytest.raises(AuditWriteFailed, match="closed"):
        audit_log.emit(VRAM_SEALED)


def test_fields_are_plain_json_and_secrets_are_refused(audit_log: AuditLog) -> None:
    rec = audit_log.emit(
        SEAL_VERIFICATION_FAILED, corrupted_ranges=[(0, 4096), (8192, 12288)], path=Path("/x")
    )
    assert rec.fields["corrupted_ranges"] == [[0, 4096], [8192, 12288]]
    assert rec.fields["path"] == "/x"
    for name in ("token", "key", "Secret", "worker_token", "audit_key"):
        with pytest.raises(InvalidInput, match="looks like a secret"):
            audit_log.emit(VRAM_SEALED, **{name: "x"})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="looks like a secret"):
        audit_log.emit(VRAM_SEALED, nested={"token": "x"})
    with pytest.raises(InvalidInput, match="bytes or keys"):
        audit_log.emit(VRAM_SEALED, blob=TOKEN.encode())
    with pytest.raises(InvalidInput, match="bytes or keys"):
        audit_log.emit(VRAM_SEALED, thing=SecretKey.from_token(TOKEN, AUDIT_KEY_INFO))
    with pytest.raises(InvalidInput):
        audit_log.emit(VRAM_SEALED, ratio=float("nan"))
    with pytest.raises(InvalidInput):
        audit_log.emit(VRAM_SEALED, text="\ud800")
    with pytest.raises(InvalidInput):
        audit_log.emit("not a name")
    # A refused event leaves no trace in the chain.
    assert audit_log.next_seq == 1


def test_token_never_appears_anywhere(log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    log = AuditLog(log_path, token=TOKEN, worker_id="w", flush_interval=None)
    log.emit(VRAM_SEALED, shard_id="s")
    log.close()
    key = SecretKey.from_token(TOKEN, AUDIT_KEY_INFO)._expose_for_tests()
    for blob in [log_path.read_bytes(), Path(str(log_path) + ".head").read_bytes(), repr(log).encode()]:
        assert TOKEN.encode() not in blob and key.hex().encode() not in blob and key not in blob
    assert TOKEN not in caplog.text


def test_error_fields_of_a_seal_failure() -> None:
    exc = SealVerificationFailed(
        "digest mismatch",
        shard_id="s1",
        expected_digest="a" * 64,
        actual_digest="b" * 64,
        corrupted_ranges=[(0, 4096)],
        corrupted_tensors=["layer.0.weight"],
    )
    f = error_fields(exc)
    assert f["shard_id"] == "s1" and f["corrupted_ranges"] == [[0, 4096]] and f["fatal"] is True
    assert f["expected_digest"] == "a" * 64 and f["actual_digest"] == "b" * 64


def test_constructor_validation(log_path: Path) -> None:
    with pytest.raises(ConfigError):
        AuditLog(log_path, worker_id="w")
    with pytest.raises(ConfigError):
        AuditLog(log_path, worker_id="w", token=TOKEN, key=SecretKey.from_token(TOKEN, AUDIT_KEY_INFO))
    with pytest.raises(ConfigError, match="too short"):
        AuditLog(log_path, worker_id="w", token="short")
    with pytest.raises(ConfigError):
        AuditLog(log_path, worker_id="", token=TOKEN)


def test_key_instead_of_token(log_path: Path) -> None:
    with AuditLog(
        log_path, worker_id="w", key=SecretKey.from_token(TOKEN, AUDIT_KEY_INFO)
    ) as log:  # slow path
        log.emit(VRAM_SEALED)
    assert verify_log(log_path, TOKEN).ok


def test_one_writer_per_log(audit_log: AuditLog, log_path: Path) -> None:
    with pytest.raises(ConfigError, match="in use"):
        AuditLog(log_path, token=TOKEN, worker_id="w2")


@pytest.mark.parametrize("alias", ["symlink", "symlinked-dir", "hardlink"])
def test_one_writer_per_log_through_another_path(tmp_path: Path, alias: str) -> None:
    """Two worker processes given two names of one log file (a symlink to it, a symlinked
    directory, a hard link): the second is refused, as it is under the same name. Each name
    has its own head file, so a lock on the head alone let both append to one file and
    interleave two chains in it."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    path = real_dir / "audit.jsonl"
    code = textwrap.dedent(
        f"""
        import sys
        from vram_residency.audit import AuditLog
        log = AuditLog({str(path)!r}, token={TOKEN!r}, worker_id="first", flush_interval=None)
        log.emit({VRAM_SEALED!r})
        log.flush()
        print("OPEN", flush=True)
        sys.stdin.readline()
        for _ in range(50):
            log.emit({VRAM_SEALED!r})
        log.close()
        print("CLOSED", flush=True)
        """
    )
    first = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdin is not None
        assert first.stdout.readline().strip() == "OPEN"
        if alias == "symlink":
            other = tmp_path / "current.jsonl"
            other.symlink_to(path)
        elif alias == "symlinked-dir":
            (tmp_path / "logs").symlink_to(real_dir, target_is_directory=True)
            other = tmp_path / "logs" / "audit.jsonl"
        else:
            other = tmp_path / "linked.jsonl"
            os.link(path, other)
        with pytest.raises(ConfigError, match="in use"):
            AuditLog(other, token=TOKEN, worker_id="second", flush_interval=None)
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "CLOSED"
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    report = verify_log(path, TOKEN)
    assert report.ok and report.records == 51, report


def _interrupt_write_at(source_line: str) -> Callable[[], None]:
    """Install a trace that raises KeyboardInterrupt (a Ctrl-C arriving just then) when
    ``_write_all`` reaches the line whose source is ``source_line``; returns the uninstaller."""
    import inspect

    code = log_module._write_all.__code__
    lines, first = inspect.getsourcelines(log_module._write_all)
    (lineno,) = [first + i for i, ln in enumerate(lines) if ln.strip() == source_line]

    def local(frame: Any, event: str, _arg: Any) -> Any:
        if event == "line" and frame.f_lineno == lineno:
            sys.settrace(None)
            raise KeyboardInterrupt
        return local

    def tracer(frame: Any, _event: str, _arg: Any) -> Any:
        return local if frame.f_code is code else None

    sys.settrace(tracer)
    return lambda: sys.settrace(None)


@pytest.mark.parametrize("at", ["view = view[n:]", "n = os.write(fd, view)"])
def test_a_write_interrupted_by_ctrl_c_leaves_one_chain(tmp_path: Path, at: str) -> None:
    """Ctrl-C lands in the write of a batch, just after the bytes went out (or just before),
    and the program then shuts down cleanly (close flushes). Every record must be in the file
    exactly once: the batch written whole was still buffered, and close wrote it a second time
    (a duplicated record: the chain breaks, the log reads as tampered with)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None)
    log.emit(VRAM_SEALED, shard_id="a")
    log.flush()
    log.emit(VRAM_SEALED, shard_id="b")
    uninstall = _interrupt_write_at(at)
    try:
        with pytest.raises(KeyboardInterrupt):
            log.flush()
    finally:
        uninstall()
    log.emit(VRAM_SEALED, shard_id="c")
    log.close()
    report = verify_log(path, TOKEN)
    assert report.ok and report.records == 3, report
    assert [json.loads(ln)["fields"]["shard_id"] for ln in read_lines(path)] == ["a", "b", "c"]


# ---------------------------------------------------------------------------- reopen, recovery


def test_reopen_continues_the_chain(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        for _ in range(3):
            log.emit(VRAM_SEALED)
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        assert log.recovery is None
        rec = log.emit(VRAM_SEALED)
        assert rec.seq == 3
    assert verify_log(log_path, TOKEN).ok


def test_reopen_with_another_token_is_refused(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        log.emit(VRAM_SEALED)
    with pytest.raises(AuditLogCorrupt) as info:
        AuditLog(log_path, token=OTHER_TOKEN, worker_id="w")
    assert TOKEN not in str(info.value) and OTHER_TOKEN not in str(info.value)
    assert info.value.fatal


def test_reopen_refuses_an_edited_last_record(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        log.emit(VRAM_SEALED, shard_id="a")
        log.emit(VRAM_SEALED, shard_id="b")
    log_path.write_bytes(log_path.read_bytes().replace(b'"b"', b'"c"'))
    with pytest.raises(AuditLogCorrupt, match="does not verify"):
        AuditLog(log_path, token=TOKEN, worker_id="w")


def test_reopen_refuses_a_log_cut_before_its_signed_head_when_asked(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        for _ in range(3):
            log.emit(VRAM_SEALED)
    lines = read_lines(log_path)
    log_path.write_bytes(b"".join(lines[:-1]))  # the attacker removes the newest record
    with pytest.raises(AuditHeadMismatch, match="signed head") as info:
        AuditLog(log_path, token=TOKEN, worker_id="w", on_head_mismatch="refuse")
    assert info.value.kind == "truncated" and info.value.head_seq == 2 and info.value.log_last_seq == 1
    assert read_lines(log_path) == lines[:-1]  # refused without writing


def test_verify_on_open_finds_a_break_in_the_middle(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        for i in range(5):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
    log_path.write_bytes(log_path.read_bytes().replace(b'"s1"', b'"zz"'))
    AuditLog(log_path, token=TOKEN, worker_id="w").close()  # the tail is fine, so it opens
    with pytest.raises(AuditLogCorrupt, match="record 1"):
        AuditLog(log_path, token=TOKEN, worker_id="w", verify_on_open=True)


@pytest.mark.parametrize("cut", [1, 17, -1])
def test_torn_tail_is_kept_aside_and_marked(
    log_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        for i in range(4):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
        last_hash = log.last_hash
    # A crash in the middle of writing a fifth record: a prefix of a real line, no newline.
    full = b'{"critical":false,"event":"VramSealed","fields":{},"id":"x","prev_hash":"' + b"0" * 64 + b'"}\n'
    torn = full[:cut]
    with open(log_path, "ab") as f:
        f.write(torn)
    report = verify_log(log_path, TOKEN)
    assert report.torn_tail and report.ok_until_torn and report.records == 4
    assert report.first_break is not None and report.first_break.index == 4

    caplog.set_level(logging.WARNING, logger="vram_residency.audit")
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        rec = log.recovery
        assert rec is not None
        assert rec.torn_bytes == len(torn) and rec.last_good_hash == last_hash and rec.last_good_seq == 3
        assert Path(rec.torn_file).read_bytes() == torn  # the evidence survives
        assert rec.marker.event == LOG_RECOVERED and rec.marker.critical
        assert rec.marker.fields["last_good_hash"] == last_hash
        assert rec.marker.fields["torn_sha256"] == hashlib.sha256(torn).hexdigest()
        log.emit(VRAM_SEALED, shard_id="after")
    assert "torn last record" in caplog.text
    assert verify_log(log_path, TOKEN).ok
    events = [o["event"] for o in records(log_path)]
    assert events[4:] == [LOG_RECOVERED, VRAM_SEALED]
    # Reopening again finds nothing torn.
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        assert log.recovery is None


def test_torn_first_record(log_path: Path) -> None:
    log_path.write_bytes(b'{"critical":tr')
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        assert log.recovery is not None and log.recovery.last_good_seq is None
        assert log.recovery.marker.prev_hash == GENESIS_HASH and log.recovery.marker.seq == 0
    assert verify_log(log_path, TOKEN).ok


# ---------------------------------------------------------------------------- head at a restart


@pytest.mark.parametrize("attack", ["delete_head", "cut_keep_head", "empty_head", "foreign_head"])
def test_restart_after_removed_records_is_recorded_and_verify_stays_broken(
    tmp_path: Path, token_file: Path, attack: str
) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 6)
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit(SEAL_VERIFICATION_FAILED, shard_id="s1", corrupted_ranges=[[0, 8]])
    lines = read_lines(path)
    if attack == "foreign_head":
        other = tmp_path / "other.jsonl"
        with AuditLog(other, token=OTHER_TOKEN, worker_id="w", flush_interval=None) as o:
            o.emit(VRAM_SEALED)
        default_head_path(path).write_bytes(default_head_path(other).read_bytes())
    else:
        path.write_bytes(b"".join(lines[:-1]))  # the incident is cut away
        if attack == "delete_head":
            default_head_path(path).unlink()
        elif attack == "empty_head":
            default_head_path(path).write_bytes(b"")
    before = verify_log(path, TOKEN, require_head=True)
    assert not before.ok

    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:  # the restart
        assert log.head_mismatch is not None
        kind = log.head_mismatch.kind
        incident = log.head_mismatch_incident_id
    assert (
        kind
        == {
            "delete_head": "missing",
            "empty_head": "missing",
            "cut_keep_head": "truncated",
            "foreign_head": "unsigned",
        }[attack]
    )
    objs = records(path)
    assert [o["event"] for o in objs[-2:]] == [AUDIT_HEAD_MISMATCH, SECURITY_INCIDENT]
    assert objs[-2]["critical"] and objs[-1]["critical"]
    assert objs[-1]["fields"]["incident_id"] == incident == objs[-2]["fields"]["incident_id"]

    after = verify_log(path, TOKEN, require_head=True)
    assert after.first_break is None  # the chain and the new head verify ...
    assert not after.ok and [a.seq for a in after.alarms] == [objs[-2]["seq"]]  # ... but not ok
    res = run_cli("audit", "verify", path, "--require-head", "--token-file", token_file)
    assert res.returncode == EXIT_BROKEN and "TAMPERED" in res.stdout, res.stdout + res.stderr

    # A second restart does not launder it either: the record stays in the chain.
    AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None).close()
    assert not verify_log(path, TOKEN, require_head=True).ok


def test_a_failed_mismatch_record_leaves_the_head_alone(tmp_path: Path) -> None:
    """If the AuditHeadMismatch record cannot be written, the head must not move on: the next
    start must find the mismatch again (or the restart would have laundered it after all)."""
    path = tmp_path / "audit.jsonl"
    write_records(path, 4)
    path.write_bytes(b"".join(read_lines(path)[:-1]))
    old_head = default_head_path(path).read_bytes()
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = {path.stat().st_size}
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        from vram_residency.audit import AuditLog, AuditWriteFailed
        try:
            AuditLog({str(path)!r}, token={TOKEN!r}, worker_id="w", flush_interval=None)
        except AuditWriteFailed as exc:
            print("FAILED", exc.operation, exc.errno)
            sys.exit(0)
        print("OPENED")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split()[:2] == ["FAILED", "write"], res.stdout + res.stderr
    assert default_head_path(path).read_bytes() == old_head
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        assert log.head_mismatch is not None and log.head_mismatch.kind == "truncated"


def test_a_new_log_gets_a_signed_empty_head_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None)
    # Before any record is synced, the head already says "empty log, signed": a crash between
    # the first sync of the log and the first head update can no longer look like a deleted head.
    head = json.loads(default_head_path(path).read_bytes())
    assert head["seq"] == -1 and head["hash"] == "0" * 64
    log.emit(VRAM_SEALED)  # buffered, never synced: as if killed now
    log._close_fds()  # drop the descriptors without the close-time flush
    log._closed = True
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as again:
        assert again.head_mismatch is None
    assert verify_log(path, TOKEN, require_head=True).ok


def test_clean_restarts_record_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for _ in range(3):
        write_records(path, 2)
    assert AUDIT_HEAD_MISMATCH not in {o["event"] for o in records(path)}
    assert verify_log(path, TOKEN, require_head=True).ok


# ---------------------------------------------------------------------------- rotation


def test_rotation_keeps_one_chain(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w", max_bytes=4096, flush_interval=None) as log:
        for i in range(200):
            log.emit(VRAM_SEALED if i % 7 else SEAL_VERIFICATION_FAILED, shard_id=f"shard-{i}")
    files = _all_files(log_path)
    assert len(files) > 5
    assert all(p.stat().st_size <= 4096 for p in files)
    # Each new file starts with the previous file's last hash.
    for older, newer in itertools.pairwise(files):
        assert records(newer)[0]["prev_hash"] == records(older)[-1]["hash"]
    objs = records(*files)
    assert [o["seq"] for o in objs] == list(range(200))
    assert verify_log(files, TOKEN).ok
    # A shell glob gives lexical order; chain_order puts it right.
    globbed = sorted(log_path.parent.glob("audit.jsonl*"))
    assert verify_log(chain_order(p for p in globbed if not p.name.endswith(".head")), TOKEN).ok


def test_rotation_continues_after_reopen(log_path: Path) -> None:
    for _ in range(3):
        with AuditLog(log_path, token=TOKEN, worker_id="w", max_bytes=2048) as log:
            for i in range(30):
                log.emit(VRAM_SEALED, shard_id=f"s{i}")
    files = _all_files(log_path)
    report = verify_log(files, TOKEN)
    assert report.ok and report.records == 90


def test_crash_between_rotation_and_next_write(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        for _ in range(3):
            log.emit(VRAM_SEALED)
    # A rotation renamed the active file, then the process died before writing the new one.
    os.rename(log_path, str(log_path) + ".1")
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        assert log.emit(VRAM_SEALED).seq == 3
    assert verify_log(_all_files(log_path), TOKEN).ok


def test_torn_write_into_a_fresh_file_after_rotation(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        for _ in range(3):
            log.emit(VRAM_SEALED)
        last_hash = log.last_hash
    os.rename(log_path, str(log_path) + ".1")
    log_path.write_bytes(b'{"critical":false,"ev')  # the first write into the new file was cut
    assert verify_log(_all_files(log_path), TOKEN).torn_tail
    with AuditLog(log_path, token=TOKEN, worker_id="w") as log:
        assert log.recovery is not None and log.recovery.last_good_hash == last_hash
        assert log.recovery.marker.seq == 3
    assert verify_log(_all_files(log_path), TOKEN).ok


def test_verifying_only_the_newest_file_says_older_files_are_missing(log_path: Path) -> None:
    with AuditLog(log_path, token=TOKEN, worker_id="w", max_bytes=2048) as log:
        for _ in range(40):
            log.emit(VRAM_SEALED)
    report = verify_log(log_path, TOKEN)
    assert report.first_break is not None and "genesis" in report.first_break.reason
    assert verify_log(log_path, TOKEN, require_genesis=False).ok


# ---------------------------------------------------------------------------- fail closed


def test_open_fails_closed_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(AuditWriteFailed) as info:
        AuditLog(blocker / "audit.jsonl", token=TOKEN, worker_id="w")
    assert info.value.fatal


def test_disk_full_fails_closed(tmp_path: Path) -> None:
    # /dev/full answers every write with ENOSPC, for root too.
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", flush_interval=None)
    log.emit(VRAM_SEALED)  # buffered: nothing written yet
    with pytest.raises(AuditWriteFailed) as info:
        log.emit(SEAL_VERIFICATION_FAILED, shard_id="s")
    assert info.value.fatal and info.value.errno == errno.ENOSPC
    assert TOKEN not in str(info.value)
    # Every later event is refused: the chain on disk and in memory no longer agree.
    with pytest.raises(AuditWriteFailed, match="refuses"):
        log.emit(VRAM_SEALED)
    assert log.failed
    log.close()


def test_non_critical_batch_write_failure_also_fails_closed(tmp_path: Path) -> None:
    log = AuditLog("/dev/full", token=TOKEN, worker_id="w", head_path=tmp_path / "h", batch_bytes=0)
    with pytest.raises(AuditWriteFailed):
        log.emit(VRAM_SEALED)
    log.close()


def test_failed_write_leaves_a_verifiable_file(monkeypatch: pytest.MonkeyPatch, log_path: Path) -> None:
    log = AuditLog(log_path, token=TOKEN, worker_id="w", flush_interval=None)
    for i in range(5):
        log.emit(SEAL_VERIFICATION_FAILED, shard_id=f"s{i}")
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes | memoryview) -> int:
        # A partial write, then the disk fills: the classic torn batch.
        if len(data) > 10:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    log.emit(VRAM_SEALED)
    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(AuditWriteFailed):
        log.emit(SEAL_VERIFICATION_FAILED, shard_id="lost")
    monkeypatch.undo()
    log.close()
    report = verify_log(log_path, TOKEN)
    assert report.ok and report.records == 5  # the partial batch was cut back off


def test_sync_failure_fails_closed(monkeypatch: pytest.MonkeyPatch, audit_log: AuditLog) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(log_module, "_datasync", eio)
    with pytest.raises(AuditWriteFailed, match="sync"):
        audit_log.emit(POLICY_VIOLATION, shard_id="s")
    assert audit_log.failed


def test_rotation_failure_fails_closed(monkeypatch: pytest.MonkeyPatch, log_path: Path) -> None:
    log = AuditLog(log_path, token=TOKEN, worker_id="w", max_bytes=1024, flush_interval=None)

    def no_rename(src: object, dst: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    def fill() -> None:
        for _ in range(50):
            log.emit(SEAL_VERIFICATION_FAILED, shard_id="s")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(AuditWriteFailed, match="rotation"):
        fill()
    assert log.failed
    log.close()


def _raise(exc: BaseException) -> Callable[..., NoReturn]:
    def f(*_a: object, **_k: object) -> NoReturn:
        raise exc

    return f


def test_signed_head_of_a_failed_log_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit(VRAM_SEALED)
        monkeypatch.setattr(log_module, "_datasync", _raise(OSError(errno.EIO, "I/O error")))
        with pytest.raises(AuditWriteFailed):
            log.signed_head()


@pytest.mark.parametrize("site", ["dup", "write", "datasync", "pwrite", "close", "rename", "open"])
def test_every_io_error_on_the_audit_path_is_an_audit_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    log = AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None, max_bytes=2048)
    try:
        log.emit(VRAM_SEALED)
        log.flush()
        # dup and open: an error other than running out of descriptors (EMFILE and ENFILE are
        # waited out, see the test after this one).
        err = OSError(
            errno.EBADF if site == "dup" else errno.EACCES if site == "open" else errno.ENOSPC, "injected"
        )
        real_close = os.close
        if site == "datasync":
            monkeypatch.setattr(log_module, "_datasync", _raise(err))
        elif site == "close":
            # Fail the close of the duplicate descriptor only (after its sync).
            monkeypatch.setattr(os, "close", lambda fd: (real_close(fd), _raise(err)())[1])
        else:
            monkeypatch.setattr(os, site, _raise(err))
        # Enough to force a rotation (rename/open sites) and a critical sync (the others).
        with pytest.raises(AuditWriteFailed) as info:
            _emit_many(log, 40)
        monkeypatch.undo()
        assert info.value.errno == err.errno and info.value.event == SEAL_VERIFICATION_FAILED
        assert info.value.operation in {"write", "sync", "rotation"}
        assert log.failed
        with pytest.raises(AuditWriteFailed) as later:
            log.emit(VRAM_SEALED)
        assert later.value.event == VRAM_SEALED and later.value.errno == err.errno
    finally:
        monkeypatch.undo()
        log.close()


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_running_out_of_descriptors_neither_fails_the_log_nor_loses_a_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of half-open connections can take every descriptor for a second. The sync then
    runs on the log's own descriptor (no dup), and a rotation that cannot open its new file is
    undone and tried again by a later append; the log stays usable and its chain whole. Before,
    either failed the log, and the worker stopped itself (a CI run of
    test_half_open_flood_under_a_low_fd_limit_keeps_health_answering, 2026-11-30)."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None, max_bytes=2048)
    try:
        log.emit(VRAM_SEALED)
        log.flush()
        err = OSError(code, "injected")
        synced: list[int] = []
        real_datasync = log_module._datasync
        monkeypatch.setattr(os, "dup", _raise(err))

        def datasync(fd: int) -> None:
            synced.append(fd)
            real_datasync(fd)

        monkeypatch.setattr(log_module, "_datasync", datasync)
        real_open = os.open

        def open_no_new_files(file: object, flags: int, *a: object, **k: object) -> int:
            if Path(str(file)) == path:
                raise err
            return real_open(file, flags, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", open_no_new_files)
        _emit_many(log, 40)  # past max_bytes several times: each rotation is put off
        log.flush()
        assert not log.failed and synced  # synced through the log's own descriptor
        assert not rotated_paths(path) and path.stat().st_size > 2048  # grown past the limit
        # Each put-off rotation waits _ROTATION_RETRY_S before the next attempt; 40 appends tried
        # once (one warning), not 40 times.
        assert caplog.text.count("no file descriptor free for its rotation") == 1
        monkeypatch.undo()
        log._rotation_retry_at = 0.0  # as if the wait were over
        _emit_many(log, 1)  # descriptors are back: this append rotates
        log.flush()
        assert len(rotated_paths(path)) == 1 and not log.failed
    finally:
        monkeypatch.undo()
        log.close()
    report = verify_log(_all_files(path), TOKEN)
    assert report.ok and report.records == 42  # every record, in one chain over both files


def _emit_many(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.emit(SEAL_VERIFICATION_FAILED, shard_id=f"s{i}", corrupted_ranges=[[0, 8]])


def test_open_errors_are_audit_write_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl"
    write_records(path, 2)
    monkeypatch.setattr(log_module, "_last_line", _raise(OSError(errno.EIO, "injected")))
    with pytest.raises(AuditWriteFailed) as info:
        AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None)
    assert info.value.operation == "open" and info.value.errno == errno.EIO


def test_the_flusher_never_dies_silently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=0.02)
    try:
        monkeypatch.setattr(log_module, "_datasync", _raise(ValueError("not an OSError")))
        log.emit(VRAM_SEALED)
        deadline = time.monotonic() + 10
        while not log.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.failed  # marked failed: the next emit raises (fail closed)
        with pytest.raises(AuditWriteFailed) as info:
            log.emit(VRAM_SEALED)
        assert info.value.operation == "flush"
    finally:
        monkeypatch.undo()
        log.close()


_CHILD_PRELUDE = """
import errno, json, os, resource, signal, sys
from vram_residency.audit import AuditLog, AuditWriteFailed
from vram_residency.errors import SealVerificationFailed
"""


def test_real_fd_exhaustion_keeps_every_record_durable(tmp_path: Path) -> None:
    """Every descriptor taken (RLIMIT_NOFILE 64, then /dev/null opened until EMFILE), as a flood
    of half-open connections does to a worker: a critical event still returns, synced through
    the log's own descriptor, and the log stays usable. (Until 2026-11-30 the sync needed a
    duplicate descriptor, and this failed the log closed; a worker then stopped itself because
    of a connection flood: test_half_open_flood_under_a_low_fd_limit_keeps_health_answering.)"""
    path = tmp_path / "a.jsonl"
    code = _CHILD_PRELUDE + textwrap.dedent(
        f"""
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        log = AuditLog({str(path)!r}, token={TOKEN!r}, worker_id="w", flush_interval=0.05)
        log.emit("VramSealed")
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        out = {{}}
        try:
            log.emit("SealVerificationFailed", shard_id="s0")  # critical: synced before it returns
            out["first"] = "returned"
        except (AuditWriteFailed, OSError) as exc:
            out["first"] = [type(exc).__name__, exc.errno]
        out["failed_during"] = log.failed
        for fd in held:
            os.close(fd)
        with open({str(path)!r}, "rb") as f:
            out["lines"] = [json.loads(line)["event"] for line in f]
        try:
            log.emit("VramSealed")
            out["later"] = "returned"
        except AuditWriteFailed:
            out["later"] = "AuditWriteFailed"
        out["flusher_alive"] = log._thread.is_alive()
        log.close()
        print(json.dumps(out))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(res.stdout.strip().splitlines()[-1]), res.stderr
    assert out[0]["first"] == "returned" and out[0]["failed_during"] is False, out
    # Written and synced while every descriptor was taken (the critical event's sync returned).
    assert out[0]["lines"][-2:] == ["VramSealed", "SealVerificationFailed"], out
    assert out[0]["later"] == "returned" and out[0]["flusher_alive"], out
    assert verify_log(path, TOKEN).ok


def test_a_full_file_keeps_what_the_caller_needs(tmp_path: Path) -> None:
    """A real EFBIG (RLIMIT_FSIZE, the nearest thing to a full disk a test can make): the error
    names the event that was lost, so the caller still raises its own error with it attached."""
    path = tmp_path / "a.jsonl"
    code = _CHILD_PRELUDE + textwrap.dedent(
        f"""
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog({str(path)!r}, token={TOKEN!r}, worker_id="w", flush_interval=None)
        log.emit("VramSealed")
        log.flush()
        size = os.path.getsize({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, size + 10))
        original = SealVerificationFailed("seal check failed", shard_id="s9", corrupted_ranges=[(0, 8)])
        try:
            try:
                log.emit("SealVerificationFailed", shard_id="s9", corrupted_ranges=[[0, 8]])
            except AuditWriteFailed as audit_exc:
                raise original from audit_exc
        except SealVerificationFailed as exc:
            cause = exc.__cause__
            print(json.dumps([type(exc).__name__, exc.shard_id, list(map(list, exc.corrupted_ranges)),
                              type(cause).__name__, cause.errno, cause.event, cause.operation]))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == [
        "SealVerificationFailed",
        "s9",
        [[0, 8]],
        "AuditWriteFailed",
        errno.EFBIG,
        "SealVerificationFailed",
        "write",
    ]
    assert verify_log(path, TOKEN).ok  # the partial write was cut back: still a valid chain


def test_audit_key_matches_the_hkdf_secret_key_and_hides_itself() -> None:
    import pickle

    from vram_residency.audit.record import AuditKey

    fast, reference = AuditKey(TOKEN), SecretKey.from_token(TOKEN, AUDIT_KEY_INFO)
    for msg in (b"", b"x", RECORD_DOMAIN + b"{}" * 500):
        assert fast.tag(msg) == reference.tag(msg)
        assert fast.verify(msg, reference.tag(msg)) and reference.verify(msg, fast.tag(msg))
    assert not fast.verify(b"x", AuditKey(OTHER_TOKEN).tag(b"x"))
    assert "redacted" in repr(fast) and "redacted" in str(fast)
    with pytest.raises(TypeError):
        pickle.dumps(fast)
    assert fast != AuditKey(TOKEN)
    with pytest.raises(ConfigError):
        AuditKey("short")
