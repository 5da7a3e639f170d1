"""Fixtures shared by the CLI tests (real processes of ``vram-residency``)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """A worker token file as an operator makes one: random, mode 0600."""
    p = tmp_path / "token"
    p.write_text(secrets.token_urlsafe(32))
    p.chmod(0o600)
    return p
