"""Where the commands write: results on stdout, everything else on stderr; a result that cannot be
written is an error, never a silent success. Real processes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def run_closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    # `cmd >&-`: file descriptor 1 closed; Python then has sys.stdout = None and print() to it
    # does nothing at all.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *CLI, *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "weights.bin"
    p.write_bytes(os.urandom(4096))
    return p


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(secrets.token_urlsafe(32))
    p.chmod(0o600)
    return p


def test_digest_with_stdout_closed_fails_instead_of_losing_the_digest(model: Path) -> None:
    # It exited 0 having printed nothing anywhere.
    out = run_closed_stdout("digest", str(model))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "standard output is closed" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_seal_with_stdout_closed_is_one_line_not_a_traceback(model: Path, token_file: Path) -> None:
    # It sealed, then died in json.dump with AttributeError: 'NoneType' object has no attribute 'write'.
    out = run_closed_stdout("seal", "--backend", "host", "--token-file", str(token_file), str(model))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "standard output is closed" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_seal_json_on_stdout_is_clean_with_verbose_logging(model: Path, token_file: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [*CLI, "-v", "seal", "--backend", "host", "--token-file", str(token_file), str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # nothing but the JSON document
    assert doc["verified"] is True and len(doc["records"]) == 1
    assert "backend:" in out.stderr
