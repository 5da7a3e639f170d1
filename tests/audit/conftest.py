"""Fixtures of the audit-trail and lifecycle tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.audit_helpers import TOKEN, write_token_file
from vram_residency.audit import AuditLog


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def audit_log(log_path: Path) -> Iterator[AuditLog]:
    # No background flusher: tests decide when data reaches the disk.
    log = AuditLog(log_path, token=TOKEN, worker_id="w-test", flush_interval=None)
    try:
        yield log
    finally:
        log.close()  # a failed log closes without raising; its error was raised already


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """A private token file holding TOKEN (and a newline, as editors write it)."""
    return write_token_file(tmp_path)
