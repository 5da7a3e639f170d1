"""Constants and helpers shared by the audit tests (imported as ``tests.audit.audit_helpers``:
pytest puts the repository root on sys.path, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKEN = "audit-test-token-0123456789abcdef"
OTHER_TOKEN = "another-worker-token-fedcba987654"


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(*paths: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        for line in read_lines(p):
            if line.endswith(b"\n"):
                out.append(json.loads(line))
    return out
