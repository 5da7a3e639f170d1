"""nh-fast-v1 through the seal core on the host backend: per-shard keys from the token, seals,
batched verification mixed with the other algorithms, the secondary fast check with its full
cadence, the scrubber's default, attestation recomputed by an orchestrator, repair, migration,
offload/restore, and the digest CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vram_residency import VramManager
from vram_residency.backends.base import Segment
from vram_residency.errors import InvalidInput, SealVerificationFailed
from vram_residency.formats import keys, nhfast
from vram_residency.formats.tree import BLAKE3, NH_FAST_V1, SHA256_TREE_V1, hash_units
from vram_residency.scrub import Scrubber, verify_before_forward
from vram_residency.shard import check_seal_record

TOKEN = "nh-fast-seal-test-token-0123456789"
OTHER = "nh-fast-seal-test-token-abcdefghij"
MiB = 1 << 20


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        self.events.append((event_type, fields))

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event_type]


def data(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def orchestrator_digest(token: str, shard_id: str, payload: bytes) -> bytes:
    """What an orchestrator holding the token computes from the file, on a CPU."""
    key = nhfast.shard_key(nhfast.manager_key(keys.token_bytes(token)), shard_id)
    return nhfast.hash_units(payload, key)[0]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def mgr(sink: Sink) -> Iterator[VramManager]:
    m = VramManager(TOKEN, backend="host", capacity_bytes=128 * MiB, audit=sink, fast_check=True)
    yield m
    m.close()


def flip_byte(m: VramManager, shard: Any, at: int) -> None:
    buf = m.device_buffer(shard)
    buf.write(at, bytes([buf.read(at, 1)[0] ^ 0x01]))


def test_keys_differ_per_shard_and_per_token() -> None:
    with (
        VramManager(TOKEN, backend="host", capacity_bytes=MiB) as a,
        VramManager(OTHER, backend="host", capacity_bytes=MiB) as b,
    ):
        ka1 = a.store.digest_key(NH_FAST_V1, "shard-1")
        ka2 = a.store.digest_key(NH_FAST_V1, "shard-2")
        kb1 = b.store.digest_key(NH_FAST_V1, "shard-1")
        assert ka1 is not None and len(ka1) == 32
        assert len({ka1, ka2, kb1}) == 3
        # The store's derivation is the spec's (formats.nhfast), recomputable from the token.
        worker = nhfast.manager_key(keys.token_bytes(TOKEN))
        assert ka1 == nhfast.shard_key(worker, "shard-1")
        assert a.store.digest_key(SHA256_TREE_V1, "shard-1") is None
        assert a.store.digest_key(BLAKE3, "shard-1") is None


def test_seal_model_nh_fast_equals_orchestrator_and_reference(mgr: VramManager) -> None:
    payload = data(2 * MiB + 4097)
    s = mgr.seal_model(payload, digest_algorithm=NH_FAST_V1)
    assert s.digest_algorithm == NH_FAST_V1
    assert s.digest == orchestrator_digest(TOKEN, s.shard_id, payload).hex()
    small = data(3 * 4096 + 5, seed=3)
    t = mgr.seal_model(small, digest_algorithm=NH_FAST_V1)
    key = nhfast.shard_key(nhfast.manager_key(keys.token_bytes(TOKEN)), t.shard_id)
    assert t.digest == nhfast.reference_hash(small, key)[0].hex()
    assert check_seal_record(s.record(), TOKEN) == s
    mgr.verify_sealed(s)


def test_seal_file_and_files_nh_fast(mgr: VramManager, tmp_path: Path) -> None:
    one, two = data(MiB + 3, seed=4), data(5000, seed=5)
    (tmp_path / "a.bin").write_bytes(one)
    (tmp_path / "b.bin").write_bytes(two)
    s = mgr.seal_file(tmp_path / "a.bin", digest_algorithm=NH_FAST_V1)
    assert s.digest == orchestrator_digest(TOKEN, s.shard_id, one).hex()
    model = mgr.seal_files([tmp_path / "a.bin", tmp_path / "b.bin"], digest_algorithm=NH_FAST_V1)
    for part, payload in zip(model.shards, (one, two), strict=True):
        assert part.digest == orchestrator_digest(TOKEN, part.shard_id, payload).hex()
    mgr.verify_model(model)


def test_verify_many_mixes_algorithms_and_localizes_nh_fast(mgr: VramManager, sink: Sink) -> None:
    shards = [
        mgr.seal_model(data(3 * MiB + 1, seed=i), digest_algorithm=alg)
        for i, alg in enumerate((SHA256_TREE_V1, BLAKE3, NH_FAST_V1, NH_FAST_V1))
    ]
    mgr.verify_many(shards)
    flip_byte(mgr, shards[2], 2 * MiB + 77)
    with pytest.raises(SealVerificationFailed) as info:
        mgr.verify_many(shards)
    assert info.value.shard_ids == [shards[2].shard_id]
    assert list(info.value.corrupted_ranges) == [(2 * MiB, 3 * MiB)]
    failed = sink.of("SealVerificationFailed")[-1]
    assert failed["check"] == "full" and failed["corrupted_ranges"] == [[2 * MiB, 3 * MiB]]


def test_host_segment_table_takes_nh_fast_keys(mgr: VramManager) -> None:
    backend = mgr.store.backend
    payload = data(MiB + 9, seed=8)
    buf = backend.allocate(len(payload))
    try:
        buf.write(0, payload)
        key = os.urandom(32)
        segs = [Segment(buf, len(payload), NH_FAST_V1, key), Segment(buf, len(payload), SHA256_TREE_V1)]
        got = backend.hash_many(segs)
        assert got[0] == hash_units(payload, NH_FAST_V1, key=key)
        assert backend.digest_many(segs) == [r.digest for r in got]
        with pytest.raises(InvalidInput):  # no key: the whole table is refused
            backend.digest_many([segs[1], Segment(buf, len(payload), NH_FAST_V1)])
    finally:
        buf.close()


def test_fast_digest_is_kept_and_fast_check_catches_and_localizes(mgr: VramManager, sink: Sink) -> None:
    payload = data(4 * MiB, seed=9)
    s = mgr.seal_model(payload)  # sha256-tree-v1, with the secondary fast digest
    record = mgr.store.lookup(s)
    assert record.fast_digest == orchestrator_digest(TOKEN, s.shard_id, payload)
    mgr.verify_many([s], check="fast")
    assert sink.of("SealVerified")[-1]["check"] == "fast"
    flip_byte(mgr, s, 3 * MiB + 5)
    with pytest.raises(SealVerificationFailed) as info:
        mgr.verify_many([s], check="fast")
    assert list(info.value.corrupted_ranges) == [(3 * MiB, 4 * MiB)]
    ev = sink.of("SealVerificationFailed")[-1]
    assert ev["check"] == "fast" and ev["reason"] == "fast digest mismatch"
    assert ev["expected_digest"] == record.fast_digest.hex()


def test_fast_check_off_falls_back_to_full(sink: Sink) -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=8 * MiB, audit=sink) as m:
        assert not m.store.fast_check  # the host emulation's default
        s = m.seal_model(data(MiB, seed=2))
        assert m.store.lookup(s).fast_digest is None
        m.verify_many([s], check="fast")
        assert sink.of("SealVerified")[-1]["check"] == "full"


def test_cadence_runs_the_full_check(mgr: VramManager, sink: Sink) -> None:
    payload = data(2 * MiB, seed=11)
    s = mgr.seal_model(payload)
    mgr.verify_many([s], check="fast", full_every_s=3600)
    assert sink.of("SealVerified")[-1]["check"] == "fast"
    mgr.verify_many([s], check="fast", full_every_s=0)
    assert sink.of("SealVerified")[-1]["check"] == "full"
    # Why the full check still runs: someone holding the key can change the bytes AND the fast
    # digest kept on the host; the fast check then passes and only the seal's digest sees it.
    record = mgr.store.lookup(s)
    flip_byte(mgr, s, 123)
    forged = bytearray(payload)
    forged[123] ^= 0x01
    key = mgr.store.digest_key(NH_FAST_V1, s.shard_id)
    assert key is not None  # nh-fast-v1 is keyed
    record.fast_digest, record.fast_units = nhfast.hash_units(bytes(forged), key)
    mgr.verify_many([s], check="fast", full_every_s=3600)
    record.last_full_ns = time.time_ns() - 3601 * 10**9
    with pytest.raises(SealVerificationFailed):
        mgr.verify_many([s], check="fast", full_every_s=3600)
    assert sink.of("SealVerificationFailed")[-1]["check"] == "full"


def test_scrubber_defaults_to_fast_and_catches_a_flip(mgr: VramManager, sink: Sink) -> None:
    shards = [mgr.seal_model(data(MiB + i, seed=i)) for i in range(3)]
    scrub = Scrubber(mgr, budget=1.0)
    assert scrub.check == "fast" and scrub.full_every_s == 600.0
    assert scrub.run_pass()
    assert {f["check"] for f in sink.of("SealVerified")[-3:]} == {"fast"}
    flip_byte(mgr, shards[1], MiB - 1)
    assert not scrub.run_pass()
    assert isinstance(scrub.last_error, SealVerificationFailed)
    assert scrub.last_error.shard_id == shards[1].shard_id
    assert sink.of("SealVerificationFailed")[-1]["check"] == "fast"
    with pytest.raises(InvalidInput):
        Scrubber(mgr, check="quick")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Scrubber(mgr, full_every_s=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1, True])
def test_non_finite_intervals_are_invalid_input(mgr: VramManager, bad: float) -> None:
    """NaN and infinity as a cadence: a typed error before any work, never a ValueError or
    OverflowError from converting them to nanoseconds (verify_many, verify_before_forward), nor
    a scrubber thread that dies in Event.wait(inf)."""
    s = mgr.seal_model(data(MiB))

    class Module:  # just what verify_before_forward needs of a torch module
        def register_forward_pre_hook(self, hook: Any) -> Any:
            return hook

    with pytest.raises(InvalidInput, match="full_every_s"):
        mgr.verify_many([s], check="fast", full_every_s=bad)
    with pytest.raises(InvalidInput, match="full_every_s"):
        mgr.verify_many([], check="fast", full_every_s=bad)
    with pytest.raises(InvalidInput, match="every_ms"):
        verify_before_forward(Module(), mgr, [s], every_ms=bad)
    with pytest.raises(InvalidInput, match="min_pass_interval_s"):
        Scrubber(mgr, min_pass_interval_s=bad)
    mgr.verify_many([s], check="fast", full_every_s=0.5)  # a finite cadence still works


def test_attest_digest_now_equals_orchestrator_recomputation(mgr: VramManager, tmp_path: Path) -> None:
    payload = data(MiB + 100, seed=12)
    path = tmp_path / "w.bin"
    path.write_bytes(payload)
    s = mgr.seal_file(path, digest_algorithm=NH_FAST_V1)
    doc = mgr.attest(os.urandom(32))
    (row,) = [r for r in doc["shards"] if r["shard_id"] == s.shard_id]
    # The orchestrator: the token, the shard id from the statement, the file; a CPU.
    assert row["digest_now"] == orchestrator_digest(TOKEN, row["shard_id"], path.read_bytes()).hex()


def test_repair_migrate_offload_restore_nh_fast(sink: Sink, tmp_path: Path) -> None:
    a = VramManager(TOKEN, 0, backend="host", capacity_bytes=64 * MiB, audit=sink, fast_check=True)
    b = VramManager(TOKEN, 1, backend="host", capacity_bytes=64 * MiB, audit=sink, fast_check=True)
    try:
        payload = data(3 * MiB + 17, seed=13)
        path = tmp_path / "m.bin"
        path.write_bytes(payload)
        s = a.seal_file(path, digest_algorithm=NH_FAST_V1)
        flip_byte(a, s, MiB + 1)
        report = a.repair(s)
        assert report.repaired_units == 1
        a.verify_sealed(s)
        new = a.migrate(s, b)
        assert new.shard_id != s.shard_id
        assert new.digest == orchestrator_digest(TOKEN, new.shard_id, payload).hex()
        b.verify_many([new], check="fast")
        b.offload(new)
        assert b.restore(new) == 0
        b.verify_sealed(new)
    finally:
        a.close()
        b.close()


def test_digest_cli_needs_token_and_shard_id(mgr: VramManager, tmp_path: Path) -> None:
    payload = data(MiB + 1, seed=14)
    path = tmp_path / "f.bin"
    path.write_bytes(payload)
    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    tok.chmod(0o600)
    s = mgr.seal_file(path, digest_algorithm=NH_FAST_V1)
    cmd = [sys.executable, "-m", "vram_residency.cli.main", "digest", "-a", NH_FAST_V1, str(path)]
    missing = subprocess.run(cmd, capture_output=True, text=True)
    # Options that do not go together are a usage error (the CLI's help: 2 for a bad option).
    assert missing.returncode == 2 and "--token-file" in missing.stderr
    ok = subprocess.run(
        [*cmd, "--token-file", str(tok), "--shard-id", s.shard_id], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[0] == s.digest
    unkeyed = subprocess.run(
        [sys.executable, "-m", "vram_residency.cli.main", "digest", str(path), "--shard-id", "x"],
        capture_output=True,
        text=True,
    )
    assert unkeyed.returncode == 2 and "nh-fast-v1 only" in unkeyed.stderr
    assert json.dumps(s.digest) not in missing.stderr
