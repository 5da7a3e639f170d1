"""The worker's ``VramManager.attest`` against the orchestrator's ``check_attestation``, on the host
backend: every check of attest-v1 refuses what it must, and the probe is standard keyed BLAKE3."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import VramManager
from vram_residency.attest import AttestationRefused, NonceStore, check_attestation, probe_file
from vram_residency.errors import AttestationMismatch, InvalidInput, NotSealed, StaleSeal
from vram_residency.formats.attest import (
    attest_key,
    attest_tag,
    probe_key,
    statement_from_json,
    statement_to_json,
)

TOKEN = "attest-test-token-0123456789abcdef"
OTHER_TOKEN = "another-worker-token-0123456789ab"
SECOND = 10**9


class ListSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        self.events.append((event_type, {"critical": critical, **fields}))


def P(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + 7 + seed) % 256 for i in range(n))


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def mgr(sink: ListSink) -> Any:
    with VramManager(TOKEN, backend="host", worker_id="worker-a", audit=sink) as m:
        yield m


def _round(mgr: VramManager, store: NonceStore, probe: bool = False) -> tuple[dict[str, Any], Any]:
    issued = store.issue(mgr.worker_id)
    return mgr.attest(issued.nonce, probe=probe), issued


def test_round_trip_accepted_then_replay_refused(mgr: VramManager, sink: ListSink) -> None:
    a = mgr.seal_model(P(5000))
    b = mgr.seal_model(P(300_001, 1), digest_algorithm="blake3")
    store = NonceStore()
    doc, issued = _round(mgr, store)
    records = [a.record(), b.record()]
    res = check_attestation(doc, TOKEN, issued.nonce, records, issued.issued_at_ns, 5 * SECOND, nonces=store)
    assert res.statement.verdict == "ok" and res.worker_id == "worker-a"
    assert [s.shard_id for s in res.statement.shards] == [a.shard_id, b.shard_id]
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(doc, TOKEN, issued.nonce, records, issued.issued_at_ns, 5 * SECOND, nonces=store)
    assert ei.value.check == 2 and "replay" in str(ei.value)
    ev = [f for name, f in sink.events if name == "AttestationIssued"]
    assert ev and ev[-1]["nonce"] == issued.nonce.hex() and ev[-1]["verdict"] == "ok"


def test_statement_for_another_nonce_refused(mgr: VramManager) -> None:
    s = mgr.seal_model(P(4097))
    store = NonceStore()
    doc, _ = _round(mgr, store)
    other = store.issue("worker-a")
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(doc, TOKEN, other.nonce, [s.record()], other.issued_at_ns, 5 * SECOND, nonces=store)
    assert ei.value.check == 2


def test_statement_from_another_worker_refused(mgr: VramManager) -> None:
    s = mgr.seal_model(P(4097))
    store = NonceStore()
    issued = store.issue("worker-b")  # issued for another worker
    doc = mgr.attest(issued.nonce)
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(
            doc, TOKEN, issued.nonce, [s.record()], issued.issued_at_ns, 5 * SECOND, worker_id="worker-b"
        )
    assert ei.value.check == 2
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(
            doc, TOKEN, issued.nonce, [s.record()], issued.issued_at_ns, 5 * SECOND, nonces=store
        )
    assert ei.value.check == 2 and "another worker" in str(ei.value)


def test_statement_under_another_token_refused(mgr: VramManager) -> None:
    s = mgr.seal_model(P(4097))
    store = NonceStore()
    doc, issued = _round(mgr, store)
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(doc, OTHER_TOKEN, issued.nonce, [s.record()], issued.issued_at_ns, 5 * SECOND)
    assert ei.value.check == 1
    assert OTHER_TOKEN not in str(ei.value) and TOKEN not in str(ei.value)


def test_late_or_early_statement_refused(mgr: VramManager) -> None:
    s = mgr.seal_model(P(4097))
    nonce = bytes(range(16))
    t0 = time.time_ns()
    doc = mgr.attest(nonce)
    with pytest.raises(AttestationRefused) as ei:  # issued long ago: the answer is late
        check_attestation(doc, TOKEN, nonce, [s.record()], t0 - 100 * SECOND, SECOND)
    assert ei.value.check == 3
    with pytest.raises(AttestationRefused) as ei:  # "issued" after the answer: it predates the nonce
        check_attestation(doc, TOKEN, nonce, [s.record()], time.time_ns() + SECOND, SECOND)
    assert ei.value.check == 3
    check_attestation(doc, TOKEN, nonce, [s.record()], t0, 100 * SECOND)


def test_missing_or_foreign_shard_refused(mgr: VramManager) -> None:
    a = mgr.seal_model(P(4097))
    b = mgr.seal_model(P(100))
    nonce, t0 = bytes(range(16)), time.time_ns()
    only_a = mgr.attest(nonce, [a])
    with pytest.raises(AttestationRefused) as ei:  # the statement leaves out a shard asked about
        check_attestation(only_a, TOKEN, nonce, [a.record(), b.record()], t0, 100 * SECOND)
    assert ei.value.check == 4 and ei.value.shard_id == b.shard_id
    with pytest.raises(AttestationRefused) as ei:  # a shard it holds no record for
        check_attestation(mgr.attest(nonce), TOKEN, nonce, [a.record()], t0, 100 * SECOND)
    assert ei.value.check == 4


def test_digest_now_not_matching_seal_refused(mgr: VramManager) -> None:
    """A correctly tagged statement whose digest_now differs from the seal (as a token holder
    could write it): refused by check 5, whatever the verdict says."""
    s = mgr.seal_model(P(4097))
    nonce, t0 = bytes(range(16)), time.time_ns()
    st_, _ = statement_from_json(mgr.attest(nonce))
    forged_row = st_.shards[0].__class__(**{**_asdict(st_.shards[0]), "digest_now": b"\x42" * 32})
    forged = st_.__class__(**{**_asdict(st_), "shards": (forged_row,)})
    doc = statement_to_json(forged, attest_tag(attest_key(TOKEN), forged))
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(doc, TOKEN, nonce, [s.record()], t0, 100 * SECOND)
    assert ei.value.check == 5


def _asdict(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


def test_corrupted_memory_gives_mismatch_statement_and_stops(mgr: VramManager, sink: ListSink) -> None:
    s = mgr.seal_model(P(3 * 2**20))
    mgr.device_buffer(s).write(2**20 + 5, b"\xff")  # a bit flip behind the seal's back
    nonce, t0 = bytes(range(20)), time.time_ns()
    with pytest.raises(AttestationMismatch) as ei:
        mgr.attest(nonce, probe=True)
    doc = ei.value.attestation
    assert doc["verdict"] == "mismatch" and ei.value.fatal
    assert ei.value.shard_id == s.shard_id
    # The statement is authentic and says which shard failed; the orchestrator refuses it.
    with pytest.raises(AttestationRefused) as ei2:
        check_attestation(doc, TOKEN, nonce, [s.record()], t0, 100 * SECOND)
    assert ei2.value.check == 5 and ei2.value.shard_id == s.shard_id
    names = [n for n, _ in sink.events]
    assert "SealVerificationFailed" in names
    failed = next(f for n, f in sink.events if n == "SealVerificationFailed")
    assert failed["critical"] and failed["corrupted_ranges"] == [[2**20, 2 * 2**20]]
    issued = next(f for n, f in sink.events if n == "AttestationIssued")
    assert issued["verdict"] == "mismatch" and issued["failed_shard_ids"] == [s.shard_id]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1023, 1024, 1025, 2048, 4097, 65536, 2**20 + 1, 3 * 2**20 - 7])
def test_probe_over_host_shards_matches_blake3_package(mgr: VramManager, n: int) -> None:
    data = P(n, n)
    s = mgr.seal_model(data)
    nonce = bytes(range(40))
    doc = mgr.attest(nonce, [s], probe=True)
    kp = probe_key(attest_key(TOKEN), nonce)
    assert doc["shards"][0]["probe"] == blake3.blake3(data, key=kp).hexdigest()


def test_probe_from_model_files(mgr: VramManager, tmp_path: Path) -> None:
    data_a, data_b = P(2**20 + 17, 3), P(70_000, 9)
    fa, fb = tmp_path / "a.bin", tmp_path / "b.bin"
    fa.write_bytes(data_a)
    fb.write_bytes(data_b)
    a, b = mgr.seal_file(fa), mgr.seal_file(fb)
    store = NonceStore()
    doc, issued = _round(mgr, store, probe=True)
    res = check_attestation(
        doc,
        TOKEN,
        issued.nonce,
        [a.record(), b.record()],
        issued.issued_at_ns,
        5 * SECOND,
        {a.shard_id: fa, b.shard_id: fb},
        nonces=store,
    )
    assert set(res.probed) == {a.shard_id, b.shard_id}
    kp = probe_key(attest_key(TOKEN), issued.nonce)
    assert probe_file(fa, kp) == blake3.blake3(data_a, key=kp).digest()


def test_cached_digest_worker_caught_by_probe(mgr: VramManager, tmp_path: Path) -> None:
    """A faulty worker that recomputed once and now answers from a cache: it still holds the
    token, so it tags a statement for the new nonce, with the new times, but reuses the cached
    digest and probe instead of reading its memory. The digest check cannot tell (the digest is
    the sealed one); the probe, keyed by the new nonce, can."""
    f = tmp_path / "w.bin"
    f.write_bytes(P(200_000, 5))
    s = mgr.seal_file(f)
    store = NonceStore()
    first, issued1 = _round(mgr, store, probe=True)
    check_attestation(
        first,
        TOKEN,
        issued1.nonce,
        [s.record()],
        issued1.issued_at_ns,
        5 * SECOND,
        {s.shard_id: f},
        nonces=store,
    )

    issued2 = store.issue("worker-a")
    cached, _ = statement_from_json(first)
    now = time.time_ns()
    row = cached.shards[0].__class__(**{**_asdict(cached.shards[0]), "verified_at_ns": now})
    replayed = cached.__class__(
        **{**_asdict(cached), "nonce": issued2.nonce, "attested_at_ns": now, "shards": (row,)}
    )
    doc = statement_to_json(replayed, attest_tag(attest_key(TOKEN), replayed))
    # Without the model bytes the cache goes unnoticed (documented limit of fresh verification)...
    check_attestation(
        copy.deepcopy(doc), TOKEN, issued2.nonce, [s.record()], issued2.issued_at_ns, 5 * SECOND
    )
    # ...with them, the probe check catches it.
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(
            doc,
            TOKEN,
            issued2.nonce,
            [s.record()],
            issued2.issued_at_ns,
            5 * SECOND,
            {s.shard_id: f},
            nonces=store,
        )
    assert ei.value.check == 6


def test_probe_asked_but_absent_refused(mgr: VramManager) -> None:
    s = mgr.seal_model(P(4097))
    nonce, t0 = bytes(range(16)), time.time_ns()
    doc = mgr.attest(nonce, probe=False)
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(doc, TOKEN, nonce, [s.record()], t0, 100 * SECOND, probe=True)
    assert ei.value.check == 6


# -- an edited field of any kind --------------------------------------------------------------------
_PATHS = [
    ("nonce",),
    ("worker_id",),
    ("attested_at_ns",),
    ("verdict",),
    ("tag",),
    ("format",),
    ("shards", 0, "shard_id"),
    ("shards", 0, "seal_signature"),
    ("shards", 0, "digest_now"),
    ("shards", 0, "probe"),
    ("shards", 0, "verified_at_ns"),
    ("shards", 1, "digest_now"),
    ("shards", 1, "probe"),
]


def _json_values() -> st.SearchStrategy[Any]:
    hexes = st.binary(min_size=0, max_size=64).map(bytes.hex)
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.text(max_size=40),
        hexes,
        st.sampled_from(["ok", "mismatch", "attest-v1", "worker-a", "worker-b"]),
        st.lists(st.integers(), max_size=2),
    )


@pytest.fixture(scope="module")
def signed() -> tuple[dict[str, Any], bytes, list[dict[str, Any]], int]:
    with VramManager(TOKEN, backend="host", worker_id="worker-a") as m:
        a, b = m.seal_model(P(5000)), m.seal_model(P(9000, 2))
        nonce, t0 = bytes(range(32)), time.time_ns()
        return m.attest(nonce, probe=True), nonce, [a.record(), b.record()], t0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_PATHS), value=_json_values(), structural=st.sampled_from(["set", "drop", "add"]))
def test_any_edited_field_refused(
    signed: tuple[dict[str, Any], bytes, list[dict[str, Any]], int],
    path: tuple[Any, ...],
    value: Any,
    structural: str,
) -> None:
    doc0, nonce, records, t0 = signed
    check_attestation(copy.deepcopy(doc0), TOKEN, nonce, records, t0, 100 * SECOND)  # the original passes
    doc = copy.deepcopy(doc0)
    parent: Any = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if structural == "drop":
        del parent[last]
    elif structural == "add":
        parent["x-" + str(last)] = value
    else:
        if parent[last] == value and type(parent[last]) is type(value):
            return  # not an edit
        parent[last] = value
    with pytest.raises((AttestationRefused, InvalidInput)):
        check_attestation(doc, TOKEN, nonce, records, t0, 100 * SECOND)


def test_shards_reordered_or_duplicated_refused(
    signed: tuple[dict[str, Any], bytes, list[dict[str, Any]], int],
) -> None:
    doc0, nonce, records, t0 = signed
    edits: tuple[Callable[[dict[str, Any]], object], ...] = (
        lambda d: d["shards"].reverse(),
        lambda d: d["shards"].append(d["shards"][0]),
        lambda d: d["shards"].pop(),
    )
    for edit in edits:
        doc = copy.deepcopy(doc0)
        edit(doc)
        with pytest.raises(AttestationRefused):
            check_attestation(doc, TOKEN, nonce, records, t0, 100 * SECOND)


def test_statement_text_nested_or_with_duplicate_keys_refused(
    signed: tuple[dict[str, Any], bytes, list[dict[str, Any]], int],
) -> None:
    """The JSON text form is parsed as strictly as a seal record: nesting deeper than the JSON
    parser's recursion limit is InvalidInput (not RecursionError), and a repeated key (here a
    second ``verdict`` after the tagged one) is refused rather than read as its last value."""
    doc0, nonce, records, t0 = signed
    for text in ("[" * 100_000, b'{"a":' * 100_000, bytearray(b"[" * 100_000)):
        with pytest.raises(InvalidInput, match="not valid JSON"):
            check_attestation(text, TOKEN, nonce, records, t0, 100 * SECOND)
    good = json.dumps(doc0)
    check_attestation(good, TOKEN, nonce, records, t0, 100 * SECOND)  # the text itself passes
    repeated = good[:-1] + ', "verdict": "ok"}'
    with pytest.raises(InvalidInput, match="duplicate key 'verdict'"):
        check_attestation(repeated, TOKEN, nonce, records, t0, 100 * SECOND)


# -- the nonce store ----------------------------------------------------------------------------------
def test_nonce_store_persists_used_nonces(tmp_path: Path) -> None:
    path = tmp_path / "nonces.jsonl"
    store = NonceStore(path)
    a, b = store.issue("w1"), store.issue("w2", 64)
    store.take(a.nonce, "w1")
    reopened = NonceStore(path)
    with pytest.raises(AttestationRefused, match="replay"):
        reopened.take(a.nonce, "w1")
    assert reopened.take(b.nonce, "w2").issued_at_ns == b.issued_at_ns
    # A torn last line (a crash mid-write) is ignored: that write never returned.
    with path.open("a") as f:
        f.write('{"op":"use","nonce":"ab')
    NonceStore(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_nonce_store_refuses_unknown_expired_and_bad_lengths(tmp_path: Path) -> None:
    store = NonceStore(ttl_ns=1)
    issued = store.issue("w")
    time.sleep(0.001)
    with pytest.raises(AttestationRefused):
        store.take(issued.nonce, "w")
    with pytest.raises(AttestationRefused):
        NonceStore().take(b"\x00" * 16, "w")
    for n in (15, 65):
        with pytest.raises(InvalidInput):
            NonceStore().issue("w", n)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"op": "nope", "nonce": "00", "t": 1}) + "\n")
    with pytest.raises(InvalidInput):
        NonceStore(bad)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe not utf-8\n",
        b"[" * 100_000 + b"\n",
        b'{"op":"issue","nonce":"00","t":1e400,"worker_id":"w"}\n',
        b'{"op":"issue","nonce":"00","t":"12","worker_id":"w"}\n',
        b'{"op":"issue","nonce":"00","t":1,"worker_id":7}\n',
        b'["op","issue"]\n',
        b'{"op":"use","nonce":5,"t":1}\n',
    ],
)
def test_nonce_store_damaged_file_is_invalid_input(tmp_path: Path, content: bytes) -> None:
    """A damaged store file is refused with InvalidInput naming the line, never a bare
    UnicodeDecodeError, RecursionError or OverflowError, and never read with guessed types."""
    path = tmp_path / "nonces.jsonl"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match="line 1 is malformed"):
        NonceStore(path)


def test_nonce_store_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot open"):
        NonceStore(tmp_path)


# -- manager inputs and seal age ---------------------------------------------------------------------
def test_attest_refuses_bad_input(mgr: VramManager) -> None:
    s = mgr.seal_model(P(100))
    for nonce in (b"", b"\x00" * 15, b"\x00" * 65, "00" * 16):
        with pytest.raises(InvalidInput):
            mgr.attest(nonce)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        mgr.attest(b"\x00" * 16, [s, s])
    with pytest.raises(NotSealed):
        mgr.attest(b"\x00" * 16, ["shard-" + "0" * 32])
    with pytest.raises(InvalidInput):
        # A bare str is a Sequence[str] to the type checker; at run time it is refused, not
        # read as one shard id per character.
        mgr.attest(b"\x00" * 16, s.shard_id)


def test_seal_age_bookkeeping_and_policy(mgr: VramManager) -> None:
    t0 = time.time_ns()
    s = mgr.seal_model(P(4097))
    sealed_at = mgr.last_verified_ns()[s.shard_id]
    assert sealed_at >= t0
    mgr.verify_sealed(s)
    verified = mgr.last_verified_ns()[s.shard_id]
    assert verified >= sealed_at
    doc = mgr.attest(b"\x01" * 16)
    assert mgr.last_verified_ns()[s.shard_id] == doc["shards"][0]["verified_at_ns"] >= verified
    assert mgr.check_seal_age(3600 * SECOND) == []
    later = time.time_ns() + 10 * SECOND
    with pytest.raises(StaleSeal) as ei:
        mgr.check_seal_age(SECOND, policy="refuse", now_ns=later)
    assert ei.value.shard_ids == [s.shard_id] and ei.value.retriable
    assert mgr.check_seal_age(SECOND, now_ns=later) == [s.shard_id]  # re-verified now
    with pytest.raises(InvalidInput):
        mgr.check_seal_age(0)
    # A clock reading that is no integer (a float NaN compares false with everything, so no
    # shard was ever stale; a string raised TypeError): InvalidInput.
    for bad in (float("nan"), "later", True, -1):
        with pytest.raises(InvalidInput, match="now_ns"):
            mgr.check_seal_age(SECOND, now_ns=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 65535, 65536, 65537, 3 * 65536, 3 * 65536 + 4097])
def test_probe_file_windows_match_blake3_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    import vram_residency.attest as attest_mod

    monkeypatch.setattr(attest_mod, "PROBE_WINDOW_BYTES", 65536)  # several windows, edges on them
    data = P(n, 11)
    f = tmp_path / "m.bin"
    f.write_bytes(data)
    kp = bytes(range(32))
    assert probe_file(f, kp) == blake3.blake3(data, key=kp).digest()


def test_probe_file_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        probe_file(tmp_path / "absent.bin", bytes(32))
    # A FIFO was opened with a plain open(), which waits for a writer forever.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="not a regular file"):
        probe_file(fifo, bytes(32))
    with pytest.raises(InvalidInput):
        probe_file(tmp_path / "absent.bin", bytes(31))
