"""Constants and helpers shared by the audit tests (imported as ``tests.audit.audit_helpers``:
pytest puts the repository root on sys.path, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from vram_residency.audit import VRAM_SEALED, AuditLog

TOKEN = "audit-test-token-0123456789abcdef"
OTHER_TOKEN = "another-worker-token-fedcba987654"
CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(*paths: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        for line in read_lines(p):
            if line.endswith(b"\n"):
                out.append(json.loads(line))
    return out


def write_records(path: Path, n: int, **kw: Any) -> None:
    """Open (or reopen) the log at ``path`` and append ``n`` VramSealed records, synchronously."""
    with AuditLog(path, token=TOKEN, worker_id="w", flush_interval=None, **kw) as log:
        for i in range(n):
            log.emit(VRAM_SEALED, shard_id=f"s{i}")


def write_token_file(directory: Path, text: str = TOKEN + "\n", name: str = "token") -> Path:
    """A token file as ``serve`` wants it: private (mode 600)."""
    p = directory / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``vram-residency ARGS`` as a real process (exit status, stdout and stderr as a user sees them)."""
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )
