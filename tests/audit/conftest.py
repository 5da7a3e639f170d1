"""Fixtures of the audit-trail and lifecycle tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path. The
# audit tests share a few helpers through one uniquely named module, so put this folder there.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from audit_helpers import TOKEN

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
