"""verify_log catches an edited, deleted, reordered or inserted record anywhere, and a record
signed with another token; property tests over random positions. Only canonical bytes verify
(a duplicate key, a space, an escape or another key order is a break), and an anchor (a head
handed out earlier) catches a rollback to an older genuine head that the head file cannot."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.audit.audit_helpers import OTHER_TOKEN, TOKEN, read_lines, run_cli, write_records
from vram_residency.audit import (
    SEAL_VERIFICATION_FAILED,
    VRAM_SEALED,
    AuditLog,
    AuditLogCorrupt,
    AuditRecord,
    SignedHead,
    canonical_bytes,
    rotated_paths,
    verify_log,
)
from vram_residency.audit.cli import EXIT_BROKEN, EXIT_OK, EXIT_USAGE, read_anchor
from vram_residency.audit.files import default_head_path
from vram_residency.errors import InvalidInput
from vram_residency.formats.keys import AUDIT_KEY_INFO, SecretKey

N = 12


@pytest.fixture(scope="module")
def base_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], bytes]:
    """Lines and head of a verified log of N records (built once per module)."""
    path = tmp_path_factory.mktemp("base") / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        for i in range(N):
            event = SEAL_VERIFICATION_FAILED if i % 5 == 4 else VRAM_SEALED
            log.emit(event, shard_id=f"shard-{i}", vram_bytes=4096 * (i + 1), ranges=[[i, i + 1]])
    assert verify_log(path, TOKEN).ok
    return read_lines(path), Path(str(path) + ".head").read_bytes()


def _verify_lines(lines: list[bytes], head: bytes, token: str = TOKEN) -> Any:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "audit.jsonl"
        path.write_bytes(b"".join(lines))
        Path(str(path) + ".head").write_bytes(head)
        return verify_log(path, token)


def _edit(line: bytes, change: Callable[[dict[str, Any]], None], *, rehash: bool) -> bytes:
    obj = json.loads(line)
    change(obj)
    if rehash:  # an attacker recomputes the public chain hash; only the HMAC stops them
        body = {k: v for k, v in obj.items() if k not in ("hash", "hmac")}
        obj["hash"] = hashlib.sha256(canonical_bytes(body)).hexdigest()
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "shard": lambda o: o["fields"].__setitem__("shard_id", o["fields"]["shard_id"] + "x"),
    "bytes": lambda o: o["fields"].__setitem__("vram_bytes", o["fields"]["vram_bytes"] + 1),
    "event": lambda o: o.__setitem__("event", "SealVerified"),
    "critical": lambda o: o.__setitem__("critical", not o["critical"]),
    "time": lambda o: o.__setitem__("time", "2000-01-01T00:00:00.000000Z"),
    "worker": lambda o: o.__setitem__("worker_id", "mallory"),
    "new_field": lambda o: o["fields"].__setitem__("note", "added"),
    "drop_field": lambda o: o["fields"].pop("ranges"),
    "prev_hash": lambda o: o.__setitem__("prev_hash", "f" * 64),
    "hash": lambda o: o.__setitem__("hash", "e" * 64),
    "hmac": lambda o: o.__setitem__("hmac", "d" * 64),
}

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(i=st.integers(0, N - 1), what=st.sampled_from(sorted(EDITS)), rehash=st.booleans())
def test_edited_record_is_caught_where_it_is(
    base_log: tuple[list[bytes], bytes], i: int, what: str, rehash: bool
) -> None:
    lines, head = base_log
    tampered = list(lines)
    # Rehashing after overwriting the hash itself would just undo the edit.
    tampered[i] = _edit(lines[i], EDITS[what], rehash=rehash and what != "hash")
    report = _verify_lines(tampered, head)
    assert not report.ok and report.first_break is not None
    assert report.first_break.position == i, report.first_break
    assert report.records == i


@PROPS
@given(i=st.integers(0, N - 1))
def test_deleted_record_is_caught_anywhere(base_log: tuple[list[bytes], bytes], i: int) -> None:
    lines, head = base_log
    report = _verify_lines(lines[:i] + lines[i + 1 :], head)
    assert not report.ok and report.first_break is not None
    # The record that took its place breaks the link; the last one is missed by the signed head.
    assert report.first_break.position == i
    if i == N - 1:
        assert "removed from the end" in report.first_break.reason
    else:
        assert "link" in report.first_break.reason or "genesis" in report.first_break.reason


@PROPS
@given(data=st.data())
def test_reordered_records_are_caught(base_log: tuple[list[bytes], bytes], data: st.DataObject) -> None:
    lines, head = base_log
    i = data.draw(st.integers(0, N - 2))
    j = data.draw(st.integers(i + 1, N - 1))
    swapped = list(lines)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    report = _verify_lines(swapped, head)
    assert report.first_break is not None and report.first_break.position == i


@PROPS
@given(i=st.integers(0, N), k=st.integers(0, N - 1))
def test_inserted_copy_of_a_record_is_caught(base_log: tuple[list[bytes], bytes], i: int, k: int) -> None:
    lines, head = base_log
    report = _verify_lines([*lines[:i], lines[k], *lines[i:]], head)
    assert report.first_break is not None
    # A replayed copy of record k placed right before the original k is itself in place; the
    # original behind it then breaks.
    assert report.first_break.position == (i + 1 if k == i else i)


@PROPS
@given(i=st.integers(0, N))
def test_inserted_forgery_with_correct_links_fails_its_hmac(
    base_log: tuple[list[bytes], bytes], i: int
) -> None:
    lines, head = base_log
    prev_hash = json.loads(lines[i - 1])["hash"] if i else "0" * 64
    _, forged = AuditRecord.seal(
        SecretKey.from_token(OTHER_TOKEN, AUDIT_KEY_INFO),
        seq=i,
        id="f" * 32,
        time="2025-01-01T00:00:00.000000Z",
        worker_id="w",
        event=VRAM_SEALED,
        critical=False,
        fields={"shard_id": "forged"},
        prev_hash=prev_hash,
    )
    report = _verify_lines([*lines[:i], forged, *lines[i:]], head)
    assert report.first_break is not None and report.first_break.position == i
    assert "hmac" in report.first_break.reason


def test_log_signed_with_another_token(base_log: tuple[list[bytes], bytes]) -> None:
    lines, head = base_log
    report = _verify_lines(lines, head, token=OTHER_TOKEN)
    # The head is checked first: it is not signed by this token either.
    assert report.first_break is not None and "not signed" in report.first_break.reason
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "audit.jsonl"
        path.write_bytes(b"".join(lines))
        brk = verify_log(path, OTHER_TOKEN, head=None).first_break
        assert brk is not None and brk.index == 0 and "hmac" in brk.reason


def test_intact_log_verifies(base_log: tuple[list[bytes], bytes]) -> None:
    lines, head = base_log
    report = _verify_lines(lines, head)
    assert report.ok and report.records == N and report.head_checked and report.last_seq == N - 1


def test_missing_head_is_a_warning_or_a_break(base_log: tuple[list[bytes], bytes], tmp_path: Path) -> None:
    lines, _ = base_log
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines[:-1]))  # a cut tail is invisible without the head ...
    report = verify_log(path, TOKEN)
    assert report.ok and not report.head_checked and report.warnings
    strict = verify_log(path, TOKEN, require_head=True)  # ... so a strict check demands it
    assert not strict.ok


def test_forged_head_is_a_break(base_log: tuple[list[bytes], bytes]) -> None:
    lines, head = base_log
    obj = json.loads(head)
    obj["seq"] = 3
    report = _verify_lines(lines, json.dumps(obj).encode())
    assert report.first_break is not None and "not signed" in report.first_break.reason


def test_tampering_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", max_bytes=2048, flush_interval=None) as log:
        for i in range(60):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")
    files = [*rotated_paths(path), path]
    assert len(files) >= 3 and verify_log(files, TOKEN).ok
    # Files given out of order break at the first record of the misplaced file.
    brk = verify_log([files[1], files[0], *files[2:]], TOKEN).first_break
    assert brk is not None and brk.file == str(files[1]) and brk.index == 0
    # Deleting the first record of the second file breaks the link into it.
    second = read_lines(files[1])
    files[1].write_bytes(b"".join(second[1:]))
    brk = verify_log(files, TOKEN).first_break
    assert brk is not None and brk.file == str(files[1]) and brk.index == 0 and "link" in brk.reason
    # A whole missing middle file is caught too.
    shutil.copy(files[0], tmp_path / "copy")
    brk = verify_log([files[0], *files[2:]], TOKEN).first_break
    assert brk is not None and brk.file == str(files[2])


def test_malformed_lines_are_breaks(base_log: tuple[list[bytes], bytes]) -> None:
    lines, head = base_log
    for bad in (b"\n", b"not json\n", b"[]\n", b'{"v":1}\n', b"\xff\xfe\n"):
        report = _verify_lines([*lines[:3], bad, *lines[3:]], head)
        assert report.first_break is not None and report.first_break.position == 3
        assert "malformed" in report.first_break.reason


_DEEP = (b"[" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000)


@pytest.mark.parametrize("deep", _DEEP, ids=["array", "object"])
def test_deeply_nested_lines_are_breaks_not_crashes(
    base_log: tuple[list[bytes], bytes], tmp_path: Path, deep: bytes
) -> None:
    """A line of 100 000 nested brackets (anyone who can write the file can add one) is a
    malformed record where it lies, in the middle or at the end: the verifier reports the
    break; it raised RecursionError. The writer reopening such a log, or a head file or anchor
    of such text, fails with the audit's typed errors, not a RecursionError."""
    lines, head = base_log
    for at in (3, len(lines)):
        report = _verify_lines([*lines[:at], deep + b"\n", *lines[at:]], head)
        assert report.first_break is not None and report.first_break.position == at
        assert "malformed" in report.first_break.reason
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join([*lines, deep + b"\n"]))
    default_head_path(path).write_bytes(head)
    with pytest.raises(AuditLogCorrupt):
        AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None)
    path.write_bytes(b"".join(lines))
    default_head_path(path).write_bytes(deep)
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        assert log.head_mismatch is not None  # an unreadable head: recorded as a mismatch
    with pytest.raises(InvalidInput, match="anchor"):
        read_anchor(deep.decode())


def test_unreadable_file_is_a_break(tmp_path: Path) -> None:
    report = verify_log(tmp_path / "missing.jsonl", TOKEN, head=None)
    assert report.first_break is not None and "unreadable" in report.first_break.reason


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
    write_records(path, 4, max_bytes=None)
    lines = read_lines(path)
    bad = _tamper_variants(lines[2])[variant]
    assert bad != lines[2] and json.loads(bad)["hash"] == json.loads(lines[2])["hash"]
    path.write_bytes(b"".join([*lines[:2], bad, *lines[3:]]))
    report = verify_log(path, TOKEN)
    assert report.first_break is not None and report.first_break.index == 2, report
    assert "canonical" in report.first_break.reason or "duplicate" in report.first_break.reason


# ---------------------------------------------------------------------------- anchors


def test_rollback_to_an_older_head_is_caught_only_by_an_anchor(tmp_path: Path, token_file: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 5)
    head_file = default_head_path(path)
    saved_head, saved_size = head_file.read_bytes(), path.stat().st_size
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        for i in range(23):
            log.emit(VRAM_SEALED, shard_id=f"later-{i}")
        anchor = log.signed_head()  # what GET /worker/audit/head hands the orchestrator
    assert isinstance(anchor, SignedHead) and anchor.seq == 27
    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_text(json.dumps({"worker_id": "w", "head": anchor.to_json()}))

    ok = run_cli(
        "audit", "verify", path, "--require-head", "--anchor", anchor_file, "--token-file", token_file
    )
    assert ok.returncode == EXIT_OK and "1 anchor(s) extended" in ok.stdout, ok.stdout + ok.stderr

    # The rollback: cut the log back to the saved size and put the saved head back.
    os.truncate(path, saved_size)
    head_file.write_bytes(saved_head)
    assert verify_log(path, TOKEN, require_head=True).ok  # undetectable without an anchor
    for given_anchor in (str(anchor_file), json.dumps(anchor.to_json())):
        res = run_cli(
            "audit", "verify", path, "--require-head", "--anchor", given_anchor, "--token-file", token_file
        )
        assert res.returncode == EXIT_BROKEN and "rollback" in res.stdout, res.stdout + res.stderr


def test_anchor_checks(tmp_path: Path, token_file: Path) -> None:
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
    # Two values for one key: refused, not read as the last one (json.loads' way).
    once = f'{{"v": 1, "seq": {first.seq}, "hash": "{first.hash}", "hmac": "{first.hmac}"}}'
    assert read_anchor(once) == first
    with pytest.raises(InvalidInput, match="'seq' twice"):
        read_anchor(once.replace('"seq":', '"seq": 0, "seq":'))
    res = run_cli("audit", "verify", path, "--anchor", tmp_path / "none", "--token-file", token_file)
    assert res.returncode == EXIT_USAGE and "Traceback" not in res.stderr


def _no() -> NoReturn:
    raise AssertionError("expected a break")


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k.lower() not in {"key", "token", "tag"}), json_values
    ),
    worker_id=st.text(min_size=1),
    seq=st.integers(0, 2**63),
    critical=st.booleans(),
)
def test_fast_canonical_form_equals_the_generic_one(
    fields: dict[str, Any], worker_id: str, seq: int, critical: bool
) -> None:
    key = SecretKey.from_token(TOKEN, AUDIT_KEY_INFO)
    try:
        rec, line = AuditRecord.seal(
            key,
            seq=seq,
            id="ab" * 16,
            time="2025-01-02T03:04:05.000006Z",
            worker_id=worker_id,
            event="SomeEvent",
            critical=critical,
            fields=fields,
            prev_hash="0" * 64,
        )
    except InvalidInput:
        return  # lone surrogates cannot be UTF-8; refused on both paths
    obj = json.loads(line)
    body = {k: v for k, v in obj.items() if k not in ("hash", "hmac")}
    assert hashlib.sha256(canonical_bytes(body)).hexdigest() == rec.hash
    assert line == canonical_bytes(body)[:-1] + f',"hash":"{rec.hash}","hmac":"{rec.hmac}"}}\n'.encode()
