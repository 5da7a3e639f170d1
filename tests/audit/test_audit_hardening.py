"""Issue 17: restarts that launder deleted records, rollback and anchors, non-canonical bytes,
fail-closed under real fd and file-size limits, the one token reader, globbed file sets."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import NoReturn

import pytest

from tests.audit.audit_helpers import OTHER_TOKEN, TOKEN, read_lines, records
from vram_residency._tokenfile import read_token_file
from vram_residency.audit import (
    AUDIT_HEAD_MISMATCH,
    SEAL_VERIFICATION_FAILED,
    SECURITY_INCIDENT,
    VRAM_SEALED,
    AuditLog,
    AuditWriteFailed,
    SignedHead,
    verify_log,
)
from vram_residency.audit import log as log_module
from vram_residency.audit.cli import EXIT_BROKEN, EXIT_OK, EXIT_USAGE, log_sets, read_anchor
from vram_residency.errors import ConfigError

CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def _head(path: Path) -> Path:
    return Path(str(path) + ".head")


def _token_file(tmp_path: Path, text: str = TOKEN + "\n", name: str = "token") -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def _cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def _write(path: Path, n: int, **kw: object) -> None:
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None, **kw) as log:  # type: ignore[arg-type]
        for i in range(n):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")


# ---------------------------------------------------------------- item 1: laundering restarts


@pytest.mark.parametrize("attack", ["delete_head", "cut_keep_head", "empty_head", "foreign_head"])
def test_restart_after_removed_records_is_recorded_and_verify_stays_broken(
    tmp_path: Path, attack: str
) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 6)
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit(SEAL_VERIFICATION_FAILED, shard_id="s1", corrupted_ranges=[[0, 8]])
    lines = read_lines(path)
    if attack == "foreign_head":
        other = tmp_path / "other.jsonl"
        with AuditLog(other, token=OTHER_TOKEN, worker_id="w", flush_interval=None) as o:
            o.emit(VRAM_SEALED)
        _head(path).write_bytes(_head(other).read_bytes())
    else:
        path.write_bytes(b"".join(lines[:-1]))  # the incident is cut away
        if attack == "delete_head":
            _head(path).unlink()
        elif attack == "empty_head":
            _head(path).write_bytes(b"")
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
    res = _cli("audit", "verify", path, "--require-head", "--token-file", _token_file(tmp_path))
    assert res.returncode == EXIT_BROKEN and "TAMPERED" in res.stdout, res.stdout + res.stderr

    # A second restart does not launder it either: the record stays in the chain.
    AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None).close()
    assert not verify_log(path, TOKEN, require_head=True).ok


def test_a_failed_mismatch_record_leaves_the_head_alone(tmp_path: Path) -> None:
    """If the AuditHeadMismatch record cannot be written, the head must not move on: the next
    start must find the mismatch again (or the restart would have laundered it after all)."""
    path = tmp_path / "audit.jsonl"
    _write(path, 4)
    path.write_bytes(b"".join(read_lines(path)[:-1]))
    old_head = _head(path).read_bytes()
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
    assert _head(path).read_bytes() == old_head
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        assert log.head_mismatch is not None and log.head_mismatch.kind == "truncated"


def test_a_new_log_gets_a_signed_empty_head_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None)
    # Before any record is synced, the head already says "empty log, signed": a crash between
    # the first sync of the log and the first head update can no longer look like a deleted head.
    head = json.loads(_head(path).read_bytes())
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
        _write(path, 2)
    assert AUDIT_HEAD_MISMATCH not in {o["event"] for o in records(path)}
    assert verify_log(path, TOKEN, require_head=True).ok


# ---------------------------------------------------------------- item 2: anchors


def test_rollback_to_an_older_head_is_caught_only_by_an_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 5)
    saved_head, saved_size = _head(path).read_bytes(), path.stat().st_size
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        for i in range(23):
            log.emit(VRAM_SEALED, shard_id=f"later-{i}")
        anchor = log.signed_head()  # what GET /worker/audit/head hands the orchestrator
    assert isinstance(anchor, SignedHead) and anchor.seq == 27
    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_text(json.dumps({"worker_id": "w", "head": anchor.to_json()}))
    tok = _token_file(tmp_path)

    ok = _cli("audit", "verify", path, "--require-head", "--anchor", anchor_file, "--token-file", tok)
    assert ok.returncode == EXIT_OK and "1 anchor(s) extended" in ok.stdout, ok.stdout + ok.stderr

    # The rollback: cut the log back to the saved size and put the saved head back.
    os.truncate(path, saved_size)
    _head(path).write_bytes(saved_head)
    assert verify_log(path, TOKEN, require_head=True).ok  # undetectable without an anchor
    for given in (str(anchor_file), json.dumps(anchor.to_json())):
        res = _cli("audit", "verify", path, "--require-head", "--anchor", given, "--token-file", tok)
        assert res.returncode == EXIT_BROKEN and "rollback" in res.stdout, res.stdout + res.stderr


def test_anchor_checks(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        empty = log.signed_head()
        log.emit(VRAM_SEALED)
        first = log.signed_head()
        log.emit(VRAM_SEALED)
    assert empty.seq == -1
    assert verify_log(path, TOKEN, anchors=[empty, first]).ok  # the log extends both
    forged = SignedHead(seq=first.seq, hash=first.hash, hmac="0" * 64)
    assert "not signed" in (verify_log(path, TOKEN, anchors=[forged]).first_break or _no()).reason
    other = SignedHead(seq=first.seq, hash="1" * 64, hmac=first.hmac)
    assert not verify_log(path, TOKEN, anchors=[other]).ok
    with pytest.raises(Exception, match="signed head"):
        read_anchor('{"seq": 1}')
    res = _cli("audit", "verify", path, "--anchor", tmp_path / "none", "--token-file", _token_file(tmp_path))
    assert res.returncode == EXIT_USAGE and "Traceback" not in res.stderr


def _no() -> NoReturn:
    raise AssertionError("expected a break")


def test_signed_head_of_a_failed_log_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit(VRAM_SEALED)
        monkeypatch.setattr(log_module, "_datasync", _raise(OSError(errno.EIO, "I/O error")))
        with pytest.raises(AuditWriteFailed):
            log.signed_head()


# ---------------------------------------------------------------- item 3: canonical bytes


def _tamper_variants(line: bytes) -> dict[str, bytes]:
    body = line.rstrip(b"\n")
    return {
        "duplicate key": body.replace(b'"event":"', b'"event":"SecurityIncident","event":"', 1) + b"\n",
        "whitespace": body.replace(b',"event"', b', "event"', 1) + b"\n",
        "trailing space": body + b" \n",
        "u escape": body.replace(b'"worker_id":"w"', b'"worker_id":"\\u0077"', 1) + b"\n",
        "crlf": body + b"\r\n",
        "key order": body.replace(b'{"critical":false,', b"{", 1).replace(
            b'"v":1,', b'"v":1,"critical":false,', 1
        )
        + b"\n",
    }


@pytest.mark.parametrize("variant", list(_tamper_variants(b"x").keys()))
def test_only_canonical_bytes_verify(tmp_path: Path, variant: str) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 4, max_bytes=None)
    lines = read_lines(path)
    bad = _tamper_variants(lines[2])[variant]
    assert bad != lines[2] and json.loads(bad)["hash"] == json.loads(lines[2])["hash"]
    path.write_bytes(b"".join([*lines[:2], bad, *lines[3:]]))
    report = verify_log(path, TOKEN)
    assert report.first_break is not None and report.first_break.index == 2, report
    assert "canonical" in report.first_break.reason or "duplicate" in report.first_break.reason


# ---------------------------------------------------------------- items 5 and 6: fail closed


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def f(*_a: object, **_k: object) -> None:
        raise exc

    return f


@pytest.mark.parametrize("site", ["dup", "write", "datasync", "pwrite", "close", "rename", "open"])
def test_every_io_error_on_the_audit_path_is_an_audit_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    log = AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None, max_bytes=2048)
    try:
        log.emit(VRAM_SEALED)
        log.flush()
        err = OSError(errno.EMFILE if site in ("dup", "open") else errno.ENOSPC, "injected")
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


def _emit_many(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.emit(SEAL_VERIFICATION_FAILED, shard_id=f"s{i}", corrupted_ranges=[[0, 8]])


def test_open_errors_are_audit_write_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl"
    _write(path, 2)
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


def test_real_fd_exhaustion_fails_closed(tmp_path: Path) -> None:
    code = _CHILD_PRELUDE + textwrap.dedent(
        f"""
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        log = AuditLog({str(tmp_path / "a.jsonl")!r}, token={TOKEN!r}, worker_id="w", flush_interval=0.05)
        log.emit("VramSealed")
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        out = {{}}
        try:
            log.emit("SealVerificationFailed", shard_id="s0")
            out["first"] = "returned"
        except AuditWriteFailed as exc:
            out["first"] = ["AuditWriteFailed", exc.errno, exc.event]
        except OSError as exc:
            out["first"] = ["raw OSError", exc.errno]
        for fd in held:
            os.close(fd)
        try:
            log.emit("VramSealed")
            out["later"] = "returned"
        except AuditWriteFailed:
            out["later"] = "AuditWriteFailed"
        out["flusher_alive"] = log._thread.is_alive() or log.failed
        print(json.dumps(out))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(res.stdout.strip().splitlines()[-1]), res.stderr
    assert out[0]["first"] == ["AuditWriteFailed", errno.EMFILE, "SealVerificationFailed"], out
    assert out[0]["later"] == "AuditWriteFailed" and out[0]["flusher_alive"], out


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


# ---------------------------------------------------------------- items 9 and 11: token files


def test_one_stripping_policy_trailing_spaces_verify(tmp_path: Path) -> None:
    tok = _token_file(tmp_path, TOKEN + "  \t\r\n")
    assert read_token_file(tok) == TOKEN
    path = tmp_path / "audit.jsonl"
    _write(path, 3)  # written under the stripped token, as serve uses it
    res = _cli("audit", "verify", path, "--token-file", tok)
    assert res.returncode == EXIT_OK, res.stdout + res.stderr


def test_a_fifo_token_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo, 0o600)
    path = tmp_path / "audit.jsonl"
    _write(path, 1)
    res = _cli("audit", "verify", path, "--token-file", fifo, timeout=30)  # used to hang forever
    assert res.returncode == EXIT_USAGE and "not a regular file" in res.stdout, res.stdout + res.stderr
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(result, fifo), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and isinstance(result[0], ConfigError)


def _catch(out: list[BaseException], path: Path) -> None:
    try:
        read_token_file(path)
    except BaseException as exc:
        out.append(exc)


def test_token_file_policy(tmp_path: Path) -> None:
    good = _token_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(good)
    assert read_token_file(link) == TOKEN  # k8s secrets and systemd credentials are symlinks
    for text, why in [("", "empty"), ("  \n", "empty"), ("a b" + "c" * 40, "whitespace"), ("tiny1", "short")]:
        with pytest.raises(ConfigError, match=why) as info:
            read_token_file(_token_file(tmp_path, text, name=f"t{len(text)}"))
        assert text.strip() == "" or text not in str(info.value)
    loose = _token_file(tmp_path, name="loose")
    loose.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(loose)
    for special in (tmp_path, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="not a regular file"):
            read_token_file(special)
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "missing")


# ---------------------------------------------------------------- item 15: globbed file sets


def test_log_sets_skip_sidecars_and_find_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 40, max_bytes=2048)
    (tmp_path / "audit.jsonl.torn-7").write_bytes(b'{"crit')
    glob = sorted(tmp_path.glob("audit.jsonl*"))
    sets, skipped = log_sets(glob)
    assert {p.name for p in skipped} == {"audit.jsonl.head", "audit.jsonl.torn-7"}
    assert len(sets) == 1 and sets[0][-1] == path and len(sets[0]) > 2
    assert log_sets([path])[0] == sets  # the active file alone brings its rotation set
    tok = _token_file(tmp_path)
    res = _cli("audit", "verify", *glob, "--require-head", "--token-file", tok)
    assert res.returncode == EXIT_OK and "skipped 2" in res.stdout, res.stdout + res.stderr
