"""Batched verification and sealing through the seal core, on the host backend's segment table."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from vram_residency import (
    InvalidInput,
    NotSealed,
    Scrubber,
    SealedModel,
    SealVerificationFailed,
    VramManager,
    check_model_record,
    check_seal_record,
)
from vram_residency.backends.base import Segment
from vram_residency.backends.host import HostBackend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE, hash_units
from vram_residency.testing import flip_bit

TOKEN = "batched-test-token-0123456789abcdef"
CAP = 512 << 20


class Recorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail_on = fail_on

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        if event_type == self.fail_on:
            raise OSError(28, "No space left on device")
        self.events.append((event_type, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


class CountingHost(HostBackend):
    """The real host backend, counting how often the segment-table calls run."""

    def __init__(self) -> None:
        super().__init__(0, CAP)
        self.digest_calls: list[int] = []

    def digest_many(
        self, segments: Any, *, priority: Any = "normal", while_running: Any = None
    ) -> list[bytes]:
        self.digest_calls.append(len(segments))
        return super().digest_many(segments, priority=priority, while_running=while_running)


def test_segment_table_matches_hash_units_on_edges() -> None:
    backend = HostBackend(0, CAP)
    rng = np.random.default_rng(1)
    sizes = [1, 3, 4095, 4097, UNIT_SIZE - 1, UNIT_SIZE + 7, 3 * UNIT_SIZE + 1]
    bufs = []
    try:
        for n in sizes:
            b = backend.allocate(n)
            b.write(0, rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            bufs.append(b)
        segs = [
            Segment(b, n, alg) for b, n in zip(bufs, sizes, strict=True) for alg in (SHA256_TREE_V1, BLAKE3)
        ]
        segs.append(Segment(bufs[0], 0, SHA256_TREE_V1))  # zero-length segment: the empty digest
        segs.append(Segment(bufs[1], 0, BLAKE3))
        key = bytes(range(32))
        segs.append(Segment(bufs[2], sizes[2], BLAKE3, key))
        full = backend.hash_many(segs)
        digests = backend.digest_many(segs)
        for seg, res, dig in zip(segs, full, digests, strict=True):
            want = hash_units(seg.buf.read(0, seg.length), seg.algorithm, key=seg.key)
            assert res == want
            assert dig == want.digest
        assert backend.digest_many(segs, priority="low") == digests
        with pytest.raises(InvalidInput):
            backend.digest_many([Segment(bufs[0], 2, SHA256_TREE_V1)])  # longer than the buffer
        with pytest.raises(InvalidInput):
            backend.digest_many(segs, priority="urgent")  # type: ignore[arg-type]
    finally:
        for b in bufs:
            b.close()


def test_thousands_of_small_shards_verify_in_one_call_and_one_flip_is_located() -> None:
    backend = CountingHost()
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        mgr.store.backend.close()
        # Swap in the counting backend before anything is sealed (same class, same behaviour).
        mgr.__dict__["_store"] = type(mgr.store)(
            _key(TOKEN), backend, device=0, worker_id="", max_model_bytes=CAP, audit=audit
        )
        shards = []
        for i in range(2000):
            n = 1 + (i * 37) % 3000  # odd and even lengths, 1 byte and up
            alg = SHA256_TREE_V1 if i % 2 else BLAKE3  # mixed algorithms in one batch
            shards.append(mgr.seal_model(os.urandom(n), digest_algorithm=alg))
        backend.digest_calls.clear()
        mgr.verify_many(shards)
        assert backend.digest_calls == [2000]  # ONE segment-table call for the whole batch
        assert audit.names().count("SealVerified") >= 2000
        victim = shards[1234]
        flip_bit(mgr, victim, 8 * (victim.vram_bytes // 2) + 3)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_many(shards)
        err = info.value
        assert err.shard_ids == [victim.shard_id]
        assert err.shard_id == victim.shard_id
        assert err.corrupted_ranges == [(0, victim.vram_bytes)]
        failed = [f for e, f in audit.events if e == "SealVerificationFailed"]
        assert [f["shard_id"] for f in failed] == [victim.shard_id]


def _key(token: str) -> Any:
    from vram_residency.formats.seal import seal_key

    return seal_key(token)


def test_several_failures_are_all_named_and_audited() -> None:
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        model = mgr.seal_tensors({f"t{i}": np.arange(1000 + i, dtype=np.uint8) for i in range(10)})
        a, b = model.shard("t2"), model.shard("t7")
        flip_bit(mgr, a, 0)
        flip_bit(mgr, b, 8 * 500)
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_model(model)
        err = info.value
        assert err.shard_ids == [a.shard_id, b.shard_id]
        assert [f.corrupted_tensors for f in err.failures] == [("t2",), ("t7",)]
        assert a.shard_id in str(err) and b.shard_id in str(err)
        failed = [f["shard_id"] for e, f in audit.events if e == "SealVerificationFailed"]
        assert failed == [a.shard_id, b.shard_id]


def test_verify_many_accepts_models_and_refuses_junk() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        model = mgr.seal_tensors([np.ones(100, dtype=np.float32), np.zeros(7, dtype=np.uint8)])
        lone = mgr.seal_model(b"abc")
        assert isinstance(model, SealedModel)
        mgr.verify_many(model)
        mgr.verify_many([model, lone, lone])  # duplicates verify once
        with pytest.raises(InvalidInput, match="SealedModel"):
            mgr.verify_model(lone)  # type: ignore[arg-type]  # #17 item 19: typed, not AttributeError
        with pytest.raises(InvalidInput):
            mgr.verify_many(lone)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            mgr.verify_many([b"x"])  # type: ignore[list-item]
        mgr.deallocate(lone)
        with pytest.raises(NotSealed):
            mgr.verify_many([model, lone])


def test_failed_seal_audits_the_failure_and_the_release() -> None:
    # #17 item 10: a wrong expected_digest answered an error, but the log had VramAllocated
    # (without a shard id), no failure event and no VramDeallocated.
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        start = mgr.available_vram()
        with pytest.raises(InvalidInput, match="does not match expected_digest"):
            mgr.seal_model(b"payload" * 100, expected_digest="0" * 64)
        assert mgr.available_vram() == start
    names = audit.names()
    assert names[:3] == ["VramAllocated", "SealFailed", "VramDeallocated"]
    ids = {audit.events[i][1].get("shard_id") for i in range(3)}
    (only,) = ids
    assert isinstance(only, str) and only.startswith("shard-")


def test_seal_failure_survives_a_failed_audit_write() -> None:
    # #17 item 6: the raised error stays SealVerificationFailed with its shard and ranges.
    audit = Recorder()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        shard = mgr.seal_model(os.urandom(3 * UNIT_SIZE))
        flip_bit(mgr, shard, 8 * (UNIT_SIZE + 5))
        audit.fail_on = "SealVerificationFailed"
        with pytest.raises(SealVerificationFailed) as info:
            mgr.verify_sealed(shard)
    err = info.value
    assert err.shard_id == shard.shard_id
    assert err.corrupted_ranges == [(UNIT_SIZE, 2 * UNIT_SIZE)]
    assert err.audit_failed and isinstance(err.audit_error, OSError)
    assert err.__cause__ is err.audit_error
    assert any("audit log could not record" in n for n in err.__notes__)


def test_records_are_accepted_as_json_text() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shard = mgr.seal_model(b"abc" * 50)
        model = mgr.seal_tensors({"w": np.ones(8, dtype=np.float32)})
    text = json.dumps(shard.record())
    assert check_seal_record(text, TOKEN) == shard
    assert check_seal_record(text.encode(), TOKEN) == shard
    assert check_model_record(json.dumps(model.record()), TOKEN).model_ref == model.model_ref
    with pytest.raises(InvalidInput, match="duplicate key"):
        check_seal_record(text[:-1] + ', "digest": "' + "0" * 64 + '"}', TOKEN)
    with pytest.raises(InvalidInput):
        check_seal_record("[1, 2]", TOKEN)
    with pytest.raises(InvalidInput):
        check_seal_record("{not json", TOKEN)


def test_auto_backend_does_not_claim_cuda_was_requested(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vram_residency")
    with VramManager(TOKEN, backend="auto", capacity_bytes=None) as mgr:
        if mgr.backend == "cuda":
            pytest.skip("a GPU is present: auto picked CUDA")
    assert "requested" not in caplog.text


def test_scrubber_finds_a_flip_within_its_budget() -> None:
    found = threading.Event()
    seen: list[SealVerificationFailed] = []
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        shards = [mgr.seal_model(os.urandom(64 << 10)) for _ in range(32)]

        def on_failure(exc: SealVerificationFailed) -> None:
            seen.append(exc)
            found.set()

        with Scrubber(mgr, budget=0.5, chunk_bytes=256 << 10, on_failure=on_failure) as scrub:
            deadline = time.monotonic() + 10
            while scrub.passes < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert scrub.passes >= 1 and scrub.last_error is None
            flip_bit(mgr, shards[20], 77)
            assert found.wait(10)
        assert not scrub.running  # stop_on_failure
        assert seen[0].shard_ids == [shards[20].shard_id]
    with pytest.raises(InvalidInput):
        Scrubber(mgr, budget=0)


def test_forward_pre_hook_verifies_at_most_every_n_ms() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from vram_residency import verify_before_forward

    module = torch.nn.Linear(4, 4)
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        model = mgr.seal_tensors(module)
        handle = verify_before_forward(module, mgr, model, every_ms=0)
        module(torch.ones(1, 4))
        with torch.no_grad():
            module.weight[0, 0] += 1
        with pytest.raises(SealVerificationFailed):
            module(torch.ones(1, 4))
        handle.remove()
