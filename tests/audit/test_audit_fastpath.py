"""The fast audit write path writes the same bytes as the reference one.

``AuditLog.emit`` and ``AuditLog.emit_many`` seal records through ``RecordSealer`` (per-log
templates, prefix HMAC states, whole-batch templates) instead of ``AuditRecord.seal``. Nothing of
the format may change: these tests hold the new path to

* known-answer lines written by ``AuditRecord.seal`` at main d928ddb, before the fast path existed;
* ``AuditRecord.seal`` itself (still the reference encoder, unchanged), for generated events,
  worker ids and batches (hypothesis);
* whole logs: every line of a log written through emit and emit_many (both batch paths,
  rotation, write-outs by size) is rebuilt from its parsed fields by ``AuditRecord.seal`` and
  must come out byte for byte; ``verify_log`` and the ``audit verify`` command accept the log.
"""

from __future__ import annotations

import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.audit.audit_helpers import TOKEN, read_lines
from vram_residency.audit import (
    SEAL_VERIFICATION_FAILED,
    SEAL_VERIFIED,
    VRAM_SEALED,
    AuditLog,
    AuditWriteFailed,
    rotated_paths,
    verify_log,
)
from vram_residency.audit import log as log_module
from vram_residency.audit.record import (
    RECORD_DOMAIN,
    AuditKey,
    AuditRecord,
    RecordSealer,
    encode_fields,
    normalize_fields,
    parse_line,
)
from vram_residency.errors import InvalidInput
from vram_residency.formats.keys import AUDIT_KEY_INFO, SecretKey, derive_key, token_bytes
from vram_residency.service.context import CorrelatedAuditLog, reset_correlation_id, set_correlation_id

KAT_TOKEN = "known-answer-token-0123456789"
#: Written by AuditRecord.seal at main d928ddb (before RecordSealer existed) for these inputs.
KAT_CASES: list[tuple[dict[str, Any], bytes]] = [
    (
        {
            "seq": 0,
            "id": "00112233445566778899aabbccddeeff",
            "time": "2026-11-29T22:00:00.000001Z",
            "worker_id": "w0",
            "event": "SealVerified",
            "critical": False,
            "fields": {
                "shard_id": "model.layers.0.weight",
                "vram_bytes": 13631488,
                "digest_algorithm": "sha256-tree-v1",
                "check": "full",
                "duration_ns": 123456,
                "batch_shards": 149,
            },
            "prev_hash": "0" * 64,
        },
        b'{"critical":false,"event":"SealVerified","fields":{"batch_shards":149,"check":"full",'
        b'"digest_algorithm":"sha256-tree-v1","duration_ns":123456,"shard_id":"model.layers.0.weight",'
        b'"vram_bytes":13631488},"id":"00112233445566778899aabbccddeeff","prev_hash":"'
        + b"0"
        * 64
        + b'","seq":0,"time":"2026-11-29T22:00:00.000001Z","v":1,"worker_id":"w0",'
        b'"hash":"59a3c8a1b99574edaa240cfb047b372d9900b282cb40ba74379cb8d218f19e1a",'
        b'"hmac":"f4fe3b338b531c881fe88f8223f71c9868802e955888dca8f50310bcd772337c"}\n',
    ),
    (
        {
            "seq": 41,
            "id": "ffeeddccbbaa99887766554433221100",
            "time": "2026-11-29T22:00:01.999999Z",
            "worker_id": 'w\u00f6rker-%s "q"',
            "event": "SealVerificationFailed",
            "critical": True,
            "fields": {
                "shard_id": 's\u00e9\n\t"x"',
                "corrupted_ranges": [[4096, 8192]],
                "corrupted_tensors": ["a", "b"],
                "tag_valid": False,
                "none": None,
                "ratio": 1.5,
                "nested": {"z": 1, "a": [True, None]},
            },
            "prev_hash": "ab" * 32,
        },
        b'{"critical":true,"event":"SealVerificationFailed","fields":{"corrupted_ranges":[[4096,8192]],'
        b'"corrupted_tensors":["a","b"],"nested":{"a":[true,null],"z":1},"none":null,"ratio":1.5,'
        b'"shard_id":"s\xc3\xa9\\n\\t\\"x\\"","tag_valid":false},"id":"ffeeddccbbaa99887766554433221100",'
        b'"prev_hash":"' + b"ab" * 32 + b'","seq":41,"time":"2026-11-29T22:00:01.999999Z","v":1,'
        b'"worker_id":"w\xc3\xb6rker-%s \\"q\\"",'
        b'"hash":"3d3926fcf2c286d19896f40f7cf8634e4d5a5299bef9378a1be159f60ad829d0",'
        b'"hmac":"1217500de7e058a3dd33e13ad34bc26ff33dcdc80c61bc4667729c0e9843c142"}\n',
    ),
]


def _sealer_line(sealer: RecordSealer, case: dict[str, Any]) -> bytes:
    fields_json = encode_fields(normalize_fields(case["fields"]))
    _, _, line = sealer.seal(
        case["event"], case["critical"], fields_json, case["seq"], case["id"], case["time"], case["prev_hash"]
    )
    return line


@pytest.mark.parametrize("index", range(len(KAT_CASES)))
def test_known_answer_lines(index: int) -> None:
    case, expected = KAT_CASES[index]
    key = AuditKey(KAT_TOKEN)
    assert AuditRecord.seal(key, **case)[1] == expected
    assert _sealer_line(RecordSealer(key, case["worker_id"]), case) == expected
    # Any other MacKey (a SecretKey of the same audit key) takes the generic tag path.
    secret = SecretKey(derive_key(token_bytes(KAT_TOKEN), AUDIT_KEY_INFO))
    assert _sealer_line(RecordSealer(secret, case["worker_id"]), case) == expected


def test_prefix_tagger_is_hmac_sha256() -> None:
    key = AuditKey(KAT_TOKEN)
    raw = derive_key(token_bytes(KAT_TOKEN), AUDIT_KEY_INFO)
    tag_hex = key._hex_tagger(RECORD_DOMAIN)
    for msg in (b"", b"x", os.urandom(63), os.urandom(64), os.urandom(1000)):
        want = hmac.new(raw, RECORD_DOMAIN + msg, "sha256").hexdigest()
        assert tag_hex(msg) == want == key.tag(RECORD_DOMAIN + msg).hex()


_SECRETS = frozenset({"token", "worker_token", "secret", "key", "secret_key", "seal_key", "audit_key",
                      "api_key", "password", "authorization", "tag", "seal_tag", "hmac_key"})  # fmt: skip
_text = st.text(max_size=12)  # any code point, lone surrogates included
_name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10).filter(
    lambda n: n.lower() not in _SECRETS
)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), _text)
_value = st.recursive(
    st.one_of(_scalar, st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_name, inner, max_size=3)),
    max_leaves=6,
)
_event = st.from_regex(r"[A-Z][A-Za-z0-9]{0,20}", fullmatch=True)
_hex = st.binary(min_size=16, max_size=16).map(bytes.hex)
_hash = st.binary(min_size=32, max_size=32).map(bytes.hex)
_time = st.integers(0, 4_000_000_000_000_000).map(
    lambda us: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 10**6)) + f".{us % 10**6:06d}Z"
)


def _reference(key: AuditKey, **kw: Any) -> bytes | type[InvalidInput]:
    try:
        return AuditRecord.seal(key, **kw)[1]
    except InvalidInput:
        return InvalidInput


_KEY = AuditKey(TOKEN)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(_name, _value, max_size=6),
    worker_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
    event=_event,
    critical=st.booleans(),
    seq=st.integers(0, 2**40),
    rid=_hex,
    prev=_hash,
    time_s=_time,
)
def test_sealer_equals_the_reference_encoder(
    fields: dict[str, Any],
    worker_id: str,
    event: str,
    critical: bool,
    seq: int,
    rid: str,
    prev: str,
    time_s: str,
) -> None:
    kw = {"seq": seq, "id": rid, "time": time_s, "worker_id": worker_id, "event": event, "critical": critical}
    try:
        norm = normalize_fields(fields)  # refuses secret-looking names: both paths then refuse
    except InvalidInput:
        with pytest.raises(InvalidInput):
            normalize_fields(dict(fields))
        return
    want = _reference(_KEY, **kw, fields=norm, prev_hash=prev)
    sealer = RecordSealer(_KEY, worker_id)
    try:
        got: bytes | type[InvalidInput] = _sealer_line(sealer, {**kw, "fields": fields, "prev_hash": prev})
    except InvalidInput:
        got = InvalidInput
    assert got == want


_flat = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), _text, st.sampled_from(["%s", "%%", "%d"])
)


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(_name, min_size=0, max_size=5, unique=True),
    data=st.data(),
    worker_id=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8),
    event=_event,
    start=_time,
)
def test_batch_prefixes_equal_the_reference_encoder(
    names: list[str], data: st.DataObject, worker_id: str, event: str, start: str
) -> None:
    n = data.draw(st.integers(1, 5))
    # Columns: some constant across the batch, some varying, some of one type, some mixed.
    batch: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in names:
        if data.draw(st.booleans()):
            v = data.draw(_flat)
            col = [v] * n
        else:
            col = data.draw(st.lists(_flat, min_size=n, max_size=n))
        for d, v in zip(batch, col, strict=True):
            d[name] = v
    sealer = RecordSealer(_KEY, worker_id)
    prefixes = sealer.batch_prefixes(event, False, batch)
    kinds = [{type(d[k]) for d in batch} for k in names]
    if any(len(k) > 1 for k in kinds):
        assert prefixes is None  # True and 1 in one column: left to the generic encoder
        return
    assert prefixes is not None and len(prefixes) == n
    prev = "0" * 64
    for seq, (fields, prefix) in enumerate(zip(batch, prefixes, strict=True)):
        rid = f"{seq:032x}"
        want = _reference(
            _KEY, seq=seq, id=rid, time=start, worker_id=worker_id, event=event, critical=False,
            fields=normalize_fields(fields), prev_hash=prev,
        )  # fmt: skip
        try:
            got: bytes | type[InvalidInput] = sealer.finish(sealer.body(prefix, rid, prev, seq, start))[2]
        except InvalidInput:
            got = InvalidInput
        assert got == want
        if isinstance(want, bytes):
            prev = json.loads(want)["hash"]


def test_batch_prefixes_refuse_what_they_cannot_spell() -> None:
    sealer = RecordSealer(_KEY, "w")
    assert sealer.batch_prefixes("E", False, [{"a": 1}, {"b": 1}]) is None  # other names
    assert sealer.batch_prefixes("E", False, [{"a": 1}, {"a": 1, "b": 2}]) is None
    assert sealer.batch_prefixes("E", False, [{"a": [1]}, {"a": [1]}]) is None  # nested
    assert sealer.batch_prefixes("E", False, [{"a": 1.5}]) is None  # floats: the encoder's repr
    assert sealer.batch_prefixes("E", False, [{"a": True}, {"a": 1}]) is None  # equal, not the same


def _rebuild(line: bytes) -> bytes:
    """The line AuditRecord.seal (the reference path) writes for the record ``line`` holds."""
    rec, _ = parse_line(line.rstrip(b"\n"))
    return AuditRecord.seal(
        _KEY, seq=rec.seq, id=rec.id, time=rec.time, worker_id=rec.worker_id, event=rec.event,
        critical=rec.critical, fields=dict(rec.fields), prev_hash=rec.prev_hash,
    )[1]  # fmt: skip


def _verify_fields(i: int) -> dict[str, Any]:
    return {
        "shard_id": f"shard-{i:04d}-\u00e9%s",
        "vram_bytes": 4096 * (i % 3),
        "digest_algorithm": "sha256-tree-v1",
        "check": "full",
        "duration_ns": 1234,
        "batch_shards": 50,
        "ok": i % 2 == 0,
        "none": None,
    }


def test_a_whole_log_is_the_reference_encoding(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    # Small files and a small buffer: rotations and size write-outs fall inside batches.
    with AuditLog(
        path, token=TOKEN, worker_id="w-%d \u00fc", flush_interval=None, max_bytes=8192, batch_bytes=3000
    ) as log:
        log.emit(VRAM_SEALED, shard_id="s0", vram_bytes=1)
        assert log.emit_many(SEAL_VERIFIED, [_verify_fields(i) for i in range(50)]) == 50  # batch prefixes
        nested = [{**_verify_fields(i), "ranges": [[i, i + 1]]} for i in range(7)]
        assert log.emit_many(SEAL_VERIFIED, nested) == 7  # generic encoder, one event at a time
        mixed: list[dict[str, Any]] = [{"x": 1}, {"x": True}, {"y": "z"}]
        assert log.emit_many(VRAM_SEALED, mixed) == 3
        assert log.emit_many(SEAL_VERIFIED, []) == 0
        log.emit(SEAL_VERIFICATION_FAILED, shard_id="s1", corrupted_ranges=[[0, 1]])
        log.emit_many(SEAL_VERIFICATION_FAILED, [{"shard_id": "s2"}, {"shard_id": "s3"}])  # critical
        log.emit(VRAM_SEALED, shard_id="last")
    files = [*rotated_paths(path), path]
    assert len(files) > 3
    lines = [line for p in files for line in read_lines(p)]
    assert len(lines) == 1 + 50 + 7 + 3 + 1 + 2 + 1
    for line in lines:
        assert _rebuild(line) == line
    seqs = [json.loads(line)["seq"] for line in lines]
    assert seqs == list(range(len(lines)))
    fields = [json.loads(line)["fields"] for line in lines]
    assert fields[1:51] == [_verify_fields(i) for i in range(50)]
    assert fields[51:58] == [{**_verify_fields(i), "ranges": [[i, i + 1]]} for i in range(7)]
    assert fields[58:61] == [{"x": 1}, {"x": True}, {"y": "z"}]
    crit = [json.loads(line)["critical"] for line in lines]
    assert crit[-4:] == [True, True, True, False] and not any(crit[:-4])
    report = verify_log(files, TOKEN, require_head=True)
    assert report.ok and report.records == len(lines), report
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    cli = [sys.executable, "-m", "vram_residency.cli.main", "audit", "verify", *map(str, files)]
    res = subprocess.run(
        [*cli, "--token-file", str(token)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_emit_many_times_are_utc_now_times(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        before = log_module._utc_now()
        log.emit_many(SEAL_VERIFIED, [{"i": i} for i in range(200)])
        after = log_module._utc_now()
    times = [json.loads(line)["time"] for line in read_lines(tmp_path / "a.jsonl")]
    assert times == sorted(times) and before <= times[0] and times[-1] <= after
    assert all(len(t) == 27 and t.endswith("Z") for t in times)


def test_emit_many_validates_before_appending(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        for bad in ([{"x": 1}, {"token": "t"}], [{"x": 1}, {"x": b"raw"}], [{1: 2}], [{"x": float("nan")}]):
            with pytest.raises(InvalidInput):
                log.emit_many(VRAM_SEALED, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            log.emit_many("not a name", [{"x": 1}])
        assert log.next_seq == 0
        # A lone surrogate fails at its own event, as emit would: the ones before stay.
        with pytest.raises(InvalidInput, match="Unicode"):
            log.emit_many(VRAM_SEALED, [{"x": "a"}, {"x": "\ud800"}])
        assert log.next_seq == 1
    assert verify_log(tmp_path / "a.jsonl", TOKEN).ok


def test_emit_many_write_failure_raises_and_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None, batch_bytes=1000)
    try:
        log.emit(VRAM_SEALED)
        log.flush()

        def fail(*_a: object) -> int:
            raise OSError(28, "injected")

        monkeypatch.setattr(os, "write", fail)
        with pytest.raises(AuditWriteFailed) as info:
            log.emit_many(SEAL_VERIFIED, [_verify_fields(i) for i in range(20)])
        monkeypatch.undo()
        assert info.value.event == SEAL_VERIFIED and info.value.operation == "write"
        assert log.failed
        with pytest.raises(AuditWriteFailed):
            log.emit_many(SEAL_VERIFIED, [_verify_fields(0)])
    finally:
        monkeypatch.undo()
        log.close()
    assert verify_log(tmp_path / "a.jsonl", TOKEN).ok  # cut back to its last complete record


def test_critical_batches_are_durable_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit_many(SEAL_VERIFICATION_FAILED, [{"shard_id": "a"}, {"shard_id": "b"}])
        assert len(read_lines(path)) == 2  # on disk (and synced) before emit_many returned
        assert log.signed_head().seq == 1
        log.emit_many(SEAL_VERIFIED, [{"shard_id": "c"}])
        assert len(read_lines(path)) == 2  # not critical: buffered, as emit would leave it


def test_subclass_that_changes_emit_sees_every_batched_event(tmp_path: Path) -> None:
    seen: list[str] = []

    class Tapped(AuditLog):
        def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> AuditRecord:
            seen.append(fields["shard_id"])
            return super().emit(event_type, critical=critical, **fields)

    with Tapped(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit_many(SEAL_VERIFIED, [{"shard_id": "a"}, {"shard_id": "b"}])
    assert seen == ["a", "b"]


def test_correlated_log_tags_batched_events(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with CorrelatedAuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        log.emit_many(SEAL_VERIFIED, [{"shard_id": "a"}])
        ctx = set_correlation_id("req-1")
        try:
            log.emit_many(SEAL_VERIFIED, [{"shard_id": "b"}, {"shard_id": "c", "correlation_id": "own"}])
        finally:
            reset_correlation_id(ctx)
    fields = [json.loads(line)["fields"] for line in read_lines(path)]
    assert fields == [
        {"shard_id": "a"},
        {"shard_id": "b", "correlation_id": "req-1"},
        {"shard_id": "c", "correlation_id": "own"},
    ]


def test_common_fields_are_each_events_fields(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with CorrelatedAuditLog(path, token=TOKEN, worker_id="w", flush_interval=None) as log:
        common = {"check": "full", "batch_shards": 2}
        log.emit_many(SEAL_VERIFIED, [{"shard_id": "a"}, {"shard_id": "b"}], common=common)  # batch path
        log.emit_many(SEAL_VERIFIED, [{"shard_id": "c", "check": "fast"}], common=common)  # own value wins
        log.emit_many(SEAL_VERIFIED, [{"shard_id": "d"}], common={"ranges": [[0, 1]]})  # nested: generic
        log.emit_many(SEAL_VERIFICATION_FAILED, [{"shard_id": "e"}], common={"reason": "r"})  # critical
        ctx = set_correlation_id("req-2")
        try:
            log.emit_many(SEAL_VERIFIED, [{"shard_id": "f"}], common=common)
            log.emit_many(SEAL_VERIFIED, [{"shard_id": "g"}], common={"correlation_id": "mine"})
        finally:
            reset_correlation_id(ctx)
        with pytest.raises(InvalidInput):
            log.emit_many(SEAL_VERIFIED, [{"shard_id": "x"}], common={"token": "t"})
        with pytest.raises(InvalidInput):
            log.emit_many(SEAL_VERIFIED, [], common={"x": b"raw"})
        assert log.next_seq == 7
    lines = read_lines(path)
    assert [json.loads(line)["fields"] for line in lines] == [
        {"shard_id": "a", "check": "full", "batch_shards": 2},
        {"shard_id": "b", "check": "full", "batch_shards": 2},
        {"shard_id": "c", "check": "fast", "batch_shards": 2},
        {"shard_id": "d", "ranges": [[0, 1]]},
        {"shard_id": "e", "reason": "r"},
        {"shard_id": "f", "check": "full", "batch_shards": 2, "correlation_id": "req-2"},
        {"shard_id": "g", "correlation_id": "mine"},
    ]
    for line in lines:
        assert _rebuild(line) == line
    assert verify_log(path, TOKEN).ok


def test_emit_many_times_follow_the_clock_across_seconds_and_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = 1_764_000_000 * 10**9
    clock = [
        base + 999_999_999,
        base + 10**9,
        base + 10**9 + 1_000,
        base - 5 * 10**9 + 7_000,
        base + 2 * 10**9,
    ]
    want = [
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9 // 1000:06d}Z"
        for ns in clock
    ]
    with AuditLog(tmp_path / "a.jsonl", token=TOKEN, worker_id="w", flush_interval=None) as log:
        ticks = iter(clock)
        monkeypatch.setattr(time, "time_ns", lambda: next(ticks))
        log.emit_many(SEAL_VERIFIED, [{"i": i} for i in range(len(clock))])
        monkeypatch.undo()
    lines = read_lines(tmp_path / "a.jsonl")
    assert [json.loads(line)["time"] for line in lines] == want
    assert want[3] < want[0]  # the step back is written as it was read, as emit would
    for line in lines:
        assert _rebuild(line) == line
