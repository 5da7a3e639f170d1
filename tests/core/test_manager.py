"""VramManager on the host backend: sealing, verification, validation, capacity, release."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vram_residency import (
    ConfigError,
    InsufficientVram,
    InvalidInput,
    NotSealed,
    SealedShard,
    SealVerificationFailed,
    VramError,
    VramManager,
    check_seal_record,
)
from vram_residency import errors as E
from vram_residency.formats import digest
from vram_residency.formats.tree import UNIT_SIZE
from vram_residency.testing import flip_bit

TOKEN = "test-worker-token-0123456789abcdef"
CAP = 64 << 20


@pytest.fixture
def mgr() -> Iterator[VramManager]:
    with VramManager(
        TOKEN, backend="host", worker_id="w-1", capacity_bytes=CAP, max_model_bytes=32 << 20
    ) as m:
        yield m


def test_backend_is_labelled_emulation(mgr: VramManager) -> None:
    assert mgr.backend == "host"
    assert "EMULATION" in mgr.backend_description


def test_auto_picks_a_working_backend(gpu_present: bool) -> None:
    with VramManager(TOKEN, capacity_bytes=CAP) as m:
        # Without a GPU (CI), auto must fall back to the emulation instead of failing.
        assert m.backend == ("cuda" if gpu_present else "host")


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3"])
def test_seal_then_verify(mgr: VramManager, algorithm: str) -> None:
    data = os.urandom(3 * UNIT_SIZE + 123)
    shard = mgr.seal_model(data, model_ref="m@1", shard_index=0, total_shards=2, digest_algorithm=algorithm)
    assert shard.digest == digest(data, algorithm).hex()
    assert shard.shard_id.startswith("shard-") and len(shard.shard_id) == 38
    assert shard.vram_bytes == len(data)
    assert shard.worker_id == "w-1"
    assert shard.sealed_at.tzinfo is not None
    mgr.verify_sealed(shard)
    assert mgr.shards() == [shard]


def test_seal_accepts_buffer_protocol_objects(mgr: VramManager) -> None:
    arr = np.arange(10_000, dtype=np.float32)
    # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; on 3.11 the array still
    # exports the buffer protocol (in C), which is what this test passes.
    s1 = mgr.seal_model(arr)  # type: ignore[arg-type]
    s2 = mgr.seal_model(memoryview(arr.tobytes()))
    s3 = mgr.seal_model(bytearray(arr.tobytes()))
    assert s1.digest == s2.digest == s3.digest


def test_secret_parts_never_shown(mgr: VramManager) -> None:
    shard = mgr.seal_model(b"x" * 1000)
    text = repr(shard) + str(shard) + repr(mgr)
    assert shard._signature.hex() not in text
    assert TOKEN not in text
    assert "_signature" not in text
    # Equality ignores the private tag.
    assert shard == dataclasses.replace(shard, _signature=b"\0" * 32)


def test_flip_detected_and_located(mgr: VramManager) -> None:
    data = os.urandom(5 * UNIT_SIZE)
    shard = mgr.seal_model(data)
    flip_bit(mgr, shard, 8 * (2 * UNIT_SIZE + 77) + 3)
    with pytest.raises(SealVerificationFailed) as info:
        mgr.verify_sealed(shard)
    exc = info.value
    assert exc.fatal and not exc.retriable
    assert exc.corrupted_ranges == [(2 * UNIT_SIZE, 3 * UNIT_SIZE)]
    assert exc.expected_digest == shard.digest
    assert exc.actual_digest != shard.digest
    # Flip it back: the original seal verifies again.
    flip_bit(mgr, shard, 8 * (2 * UNIT_SIZE + 77) + 3)
    mgr.verify_sealed(shard)


def test_adjacent_units_merge_into_one_range(mgr: VramManager) -> None:
    shard = mgr.seal_model(os.urandom(4 * UNIT_SIZE + 5))
    flip_bit(mgr, shard, 8 * (UNIT_SIZE + 1))
    flip_bit(mgr, shard, 8 * (2 * UNIT_SIZE + 1))
    flip_bit(mgr, shard, 8 * (4 * UNIT_SIZE + 4))
    with pytest.raises(SealVerificationFailed) as info:
        mgr.verify_sealed(shard)
    assert info.value.corrupted_ranges == [(UNIT_SIZE, 3 * UNIT_SIZE), (4 * UNIT_SIZE, 4 * UNIT_SIZE + 5)]


def test_tampered_shard_fields_fail(mgr: VramManager) -> None:
    shard = mgr.seal_model(b"a" * 5000)
    forged = dataclasses.replace(shard, model_ref="other")
    with pytest.raises(SealVerificationFailed) as info:
        mgr.verify_sealed(forged)
    assert info.value.tag_valid is False
    assert info.value.corrupted_ranges == []


def test_other_manager_cannot_verify(mgr: VramManager) -> None:
    shard = mgr.seal_model(b"a" * 5000)
    with VramManager("another-token-0123456789abcdef", backend="host", capacity_bytes=CAP) as other:
        with pytest.raises(NotSealed):
            other.verify_sealed(shard)
    with pytest.raises(SealVerificationFailed):
        check_seal_record(shard.record(), "another-token-0123456789abcdef")


def test_seal_record_roundtrip(mgr: VramManager) -> None:
    shard = mgr.seal_model(b"a" * 5000, model_ref="m")
    rec = shard.record()
    assert rec["signature"] == shard._signature.hex()
    again = check_seal_record(rec, TOKEN)
    assert again == shard
    rec["vram_bytes"] += 1
    with pytest.raises(SealVerificationFailed):
        check_seal_record(rec, TOKEN)
    with pytest.raises(InvalidInput):
        check_seal_record({"format": "seal-v1"}, TOKEN)


@pytest.mark.parametrize(
    ("kwargs", "data"),
    [
        ({}, b""),
        ({}, b"x" * ((32 << 20) + 1)),
        ({"device": 1}, b"x"),
        ({"device": True}, b"x"),
        ({"model_ref": ""}, b"x"),
        ({"model_ref": 5}, b"x"),
        ({"shard_index": 2, "total_shards": 2}, b"x"),
        ({"shard_index": 0}, b"x"),
        ({"shard_index": -1, "total_shards": 2}, b"x"),
        ({"expected_digest": "zz"}, b"x"),
        ({"digest_algorithm": "md5"}, b"x"),
        ({"expected_digest": "0" * 64}, b"x"),
    ],
)
def test_invalid_input_leaves_nothing(mgr: VramManager, kwargs: dict[str, object], data: bytes) -> None:
    free = mgr.available_vram()
    with pytest.raises(InvalidInput):
        mgr.seal_model(data, **kwargs)  # type: ignore[arg-type]
    assert mgr.available_vram() == free
    assert mgr.shards() == []


@pytest.mark.parametrize("bad", ["text", 12, None, object(), [1, 2]])
def test_wrong_types(mgr: VramManager, bad: object) -> None:
    with pytest.raises(InvalidInput):
        mgr.seal_model(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        mgr.verify_sealed(bad)  # type: ignore[arg-type]


def test_expected_digest_match_and_case(mgr: VramManager) -> None:
    data = os.urandom(9000)
    shard = mgr.seal_model(data, expected_digest=digest(data).hex().upper())
    assert shard.digest == digest(data).hex()


@pytest.mark.parametrize("token", ["", "short", b"", 123])
def test_bad_tokens(token: object) -> None:
    with pytest.raises(ConfigError):
        VramManager(token, backend="host")  # type: ignore[arg-type]


def test_bad_config() -> None:
    with pytest.raises(ConfigError):
        VramManager(TOKEN, backend="tpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        VramManager(TOKEN, device=-1, backend="host")
    with pytest.raises(ConfigError):
        VramManager(TOKEN, backend="host", capacity_bytes=0)
    with pytest.raises(ConfigError):
        VramManager(TOKEN, backend="host", max_model_bytes=0)


@pytest.mark.parametrize("device", [2**32, 2**63, 2**70])
def test_device_beyond_the_seal_format_is_config_error(device: int) -> None:
    """seal-v1 binds the device as a 32-bit field: a manager for device 2**32 could never seal
    anything (every seal allocated, then failed on the record). Refused when it is made."""
    with pytest.raises(ConfigError, match="device"):
        VramManager(TOKEN, device=device, backend="host")
    with VramManager(TOKEN, device=2**32 - 1, backend="host", capacity_bytes=CAP) as m:
        assert m.seal_model(b"x" * 10).gpu_device == 2**32 - 1


@pytest.mark.parametrize(
    "kw",
    [
        {"model_ref": "a\ud800b"},
        {"shard_index": 2**64, "total_shards": 2**64 + 1},
        {"shard_index": 0, "total_shards": 2**70},
    ],
    ids=["surrogate model_ref", "shard_index 2**64", "total_shards 2**70"],
)
def test_seal_fields_the_record_cannot_hold_are_refused_before_allocating(kw: dict[str, Any]) -> None:
    """A model_ref with no UTF-8 form, a shard index beyond seal-v1's 64-bit field: refused
    before any memory is allocated (they were refused only when the record was built, after
    the allocation and the copy, audited as an allocation and a failed seal)."""
    audit = Events()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as m:
        with pytest.raises(InvalidInput):
            m.seal_model(b"x" * 10, **kw)
        assert audit.events == []


def test_insufficient_vram(mgr: VramManager) -> None:
    mgr.seal_model(b"x" * (30 << 20))
    mgr.seal_model(b"y" * (30 << 20))
    free = mgr.available_vram()
    with pytest.raises(InsufficientVram) as info:
        mgr.seal_model(b"x" * (31 << 20))
    assert info.value.retriable and not info.value.fatal
    assert info.value.needed == 31 << 20
    assert info.value.available == free
    assert mgr.available_vram() == free


def test_capacity_and_deallocate(mgr: VramManager) -> None:
    assert mgr.total_vram() == CAP
    shard = mgr.seal_model(b"x" * 1000)
    assert mgr.available_vram() == CAP - 1024  # rounded up to 256-byte alignment
    mgr.deallocate(shard)
    assert mgr.available_vram() == CAP
    with pytest.raises(NotSealed):
        mgr.verify_sealed(shard)
    with pytest.raises(NotSealed):
        mgr.deallocate(shard)


def test_close_frees_and_zeroes() -> None:
    m = VramManager(TOKEN, backend="host", capacity_bytes=CAP)
    shard = m.seal_model(b"\xff" * 10_000)
    buf = m._entry(shard).buf
    m.close()
    assert buf.closed
    m.close()  # idempotent
    with pytest.raises(NotSealed):
        m.verify_sealed(shard)
    with pytest.raises(VramError):
        m.seal_model(b"x")


def test_error_classification() -> None:
    assert E.InsufficientVram(1, 0).retriable
    assert E.CudaAllocationFailed("x").retriable
    cls: type[E.VramError]
    for cls in (E.SealVerificationFailed, E.IntegrityViolation, E.PolicyViolation):
        assert cls("x").fatal
        assert not cls("x").retriable
    for cls in (E.InvalidInput, E.NotSealed, E.ConfigError):
        assert not cls("x").fatal and not cls("x").retriable


def test_flip_bit_bounds(mgr: VramManager) -> None:
    shard = mgr.seal_model(b"x" * 10)
    with pytest.raises(InvalidInput):
        flip_bit(mgr, shard, 80)
    with pytest.raises(InvalidInput):
        flip_bit(mgr, shard, -1)


def test_shards_list_is_snapshot(mgr: VramManager) -> None:
    a = mgr.seal_model(b"a" * 100)
    b = mgr.seal_model(b"b" * 100)
    assert {s.shard_id for s in mgr.shards()} == {a.shard_id, b.shard_id}
    assert isinstance(mgr.shards()[0], SealedShard)


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        self.events.append((event_type, fields))


@pytest.mark.parametrize("how", ["deallocate", "offload"])
def test_freeing_a_shard_whose_view_is_still_held_is_still_audited(how: str) -> None:
    """A caller still holds ``device_buffer(shard).host_view()`` when the shard is deallocated
    (or offloaded): the memory is zeroed and given back, and the free raises IntegrityViolation
    because the view keeps the mapping alive. The shard is gone all the same, so the audit log
    must say so (``VramDeallocated``), as close() does in the same case; it said nothing."""
    audit = Events()
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        start = mgr.available_vram()
        s = mgr.seal_model(os.urandom(5000))
        view = mgr.device_buffer(s).host_view()
        free_it = mgr.deallocate if how == "deallocate" else mgr.offload
        with pytest.raises(E.IntegrityViolation, match="view"):
            free_it(s)
        assert bytes(view) == bytes(len(view))  # zeroed
        assert mgr.available_vram() == start and mgr.shards() == []
        freed = [f for e, f in audit.events if e == "VramDeallocated"]
        assert [f["shard_id"] for f in freed] == [s.shard_id]
        view.release()
        if how == "offload":
            mgr.restore(s)  # the verified copy is kept: the shard comes back
            mgr.verify_sealed(s)


class InterruptedAudit:
    """An audit sink where Ctrl-C lands while the first ``VramDeallocated`` is written."""

    def __init__(self) -> None:
        self.freed = 0

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        if event_type == "VramDeallocated":
            self.freed += 1
            if self.freed == 1:
                raise KeyboardInterrupt


def test_ctrl_c_during_close_still_frees_every_shard() -> None:
    """Ctrl-C lands while close() audits the first shard's release: the other shards must be
    zeroed and freed and the backend released all the same, and the KeyboardInterrupt raised
    at the end. close() stopped at the first shard, and being idempotent, never freed the rest."""
    audit = InterruptedAudit()
    mgr = VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit)
    shards = [mgr.seal_model(os.urandom(5000)) for _ in range(3)]
    bufs = [mgr.device_buffer(s) for s in shards]
    with pytest.raises(KeyboardInterrupt):
        mgr.close()
    assert all(b.closed for b in bufs)
    assert mgr._backend.mem_info() == (CAP, CAP)
    assert audit.freed == 3  # every release audited, the interrupted one included
    mgr.close()  # idempotent


# -- an audit sink that fails: nothing sealed stays allocated, close frees everything ------------


class FailingAudit:
    """An audit sink whose log fails on a given event type (disk full, closed log, ...)."""

    def __init__(self, fail_on: str) -> None:
        self.fail_on = fail_on
        self.armed = True

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        if self.armed and event_type == self.fail_on:
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("event", ["VramAllocated", "VramSealed"])
def test_audit_failure_while_sealing_frees_device_memory(event: str) -> None:
    audit = FailingAudit(event)
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        start = mgr.available_vram()
        with pytest.raises(OSError, match="No space left"):
            mgr.seal_model(os.urandom(5000))
        assert mgr.available_vram() == start
        assert mgr.shards() == []


def test_audit_failure_while_sealing_files_frees_device_memory(tmp_path: Path) -> None:
    audit = FailingAudit("VramSealed")
    files = []
    for i in range(2):
        f = tmp_path / f"part{i}.bin"
        f.write_bytes(os.urandom(3000))
        files.append(f)
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit) as mgr:
        start = mgr.available_vram()
        with pytest.raises(OSError, match="No space left"):
            mgr.seal_files(files)
        assert mgr.available_vram() == start
        assert mgr.shards() == []  # no half-registered shard whose buffer was freed


def test_close_frees_every_shard_even_if_the_audit_log_fails() -> None:
    audit = FailingAudit("VramDeallocated")
    audit.armed = False
    mgr = VramManager(TOKEN, backend="host", capacity_bytes=CAP, audit=audit)
    backend = mgr._backend
    start = mgr.available_vram()
    for _ in range(3):
        mgr.seal_model(os.urandom(1000))
    audit.armed = True
    with pytest.raises(OSError, match="No space left"):
        mgr.close()
    assert backend.mem_info()[0] == start


@pytest.mark.parametrize("field", ["shard_id", "worker_id", "model_ref"])
def test_seal_record_with_lone_surrogate_is_invalid_input(field: str) -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        record = mgr.seal_model(b"x" * 100, model_ref="m@1").record()
    record[field] = "\ud800"
    with pytest.raises(InvalidInput):
        check_seal_record(record, TOKEN)


def test_worker_id_with_lone_surrogate_is_config_error() -> None:
    with pytest.raises(ConfigError):
        VramManager(TOKEN, backend="host", capacity_bytes=CAP, worker_id="w\udc00")


def test_an_interrupt_inside_the_allocation_record_still_audits_the_release(tmp_path: Path) -> None:
    # serve's SIGTERM during the startup load (or Ctrl-C in a CLI seal) is raised in the main
    # thread at any bytecode, so also inside the store's emit of VramAllocated, after the record
    # was written. The buffer is freed there; the trail must show that release too (a CI run of
    # test_worker_4960_4972_sigterm_while_the_startup_model_loads_exits_0 found it missing).
    import json

    from vram_residency.audit import VRAM_ALLOCATED, AuditLog

    path = tmp_path / "audit.jsonl"
    with (
        AuditLog(path, token=TOKEN, worker_id="w-1", flush_interval=None) as log,
        VramManager(TOKEN, backend="host", worker_id="w-1", capacity_bytes=CAP, audit=log) as m,
    ):
        free = m.available_vram()
        real_emit = m.store.emit

        def emit(event: str, **fields: Any) -> Any:
            out = real_emit(event, **fields)
            if event == VRAM_ALLOCATED:
                raise KeyboardInterrupt  # as if the signal came just after the record was written
            return out

        m.store.emit = emit  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            m.seal_model(os.urandom(4096))
        assert m.available_vram() == free and m.shards() == []
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events.index("VramDeallocated") > events.index("VramAllocated"), events
