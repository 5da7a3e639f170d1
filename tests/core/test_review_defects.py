"""Regression tests for defects found in review: leaks on audit failures, untyped errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from vram_residency import ConfigError, InvalidInput, VramManager, check_seal_record
from vram_residency.formats.keys import token_bytes

TOKEN = "review-test-token-0123456789abcdef"
CAP = 16 << 20


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


def test_token_with_lone_surrogate_is_config_error_without_its_text() -> None:
    secret = "abcdefghijklmnop\ud800qrstuvw"
    with pytest.raises(ConfigError) as info:
        token_bytes(secret)
    assert "\ud800" not in str(info.value) and "abcdefgh" not in str(info.value)
    # Not even as the (hidden) context: a UnicodeEncodeError holds the whole string.
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_worker_id_with_lone_surrogate_is_config_error() -> None:
    with pytest.raises(ConfigError):
        VramManager(TOKEN, backend="host", capacity_bytes=CAP, worker_id="w\udc00")


def test_paths_with_nul_bytes_are_invalid_input(tmp_path: Path) -> None:
    good = tmp_path / "m.bin"
    good.write_bytes(b"y" * 64)
    with VramManager(TOKEN, backend="host", capacity_bytes=CAP) as mgr:
        start = mgr.available_vram()
        with pytest.raises(InvalidInput):
            mgr.seal_file("model\x00.bin")
        with pytest.raises(InvalidInput):
            mgr.seal_files(["a.bin", "b\x00.bin"])
        with pytest.raises(InvalidInput):
            mgr.seal_file(good, manifest="manifest\x00.json")
        assert mgr.available_vram() == start
