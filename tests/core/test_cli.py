"""The command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vram_residency.formats import digest

CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def test_digest_matches_library(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    data = os.urandom((3 << 20) + 5)
    f.write_bytes(data)
    for alg in ("sha256-tree-v1", "blake3"):
        out = run("digest", "-a", alg, str(f))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == digest(data, alg).hex()


def test_digest_missing_file_and_directory(tmp_path: Path) -> None:
    out = run("digest", str(tmp_path / "nope"))
    assert out.returncode == 1
    assert "cannot open" in out.stderr
    out = run("digest", str(tmp_path))
    assert out.returncode == 1
    assert "directory" in out.stderr


def test_demo_detects_the_flip() -> None:
    out = run("demo", "--size-mib", "4", "--backend", "host")
    assert out.returncode == 0, out.stderr
    assert "EMULATION" in out.stdout
    assert "detected: SealVerificationFailed" in out.stdout
    assert "contains the flipped byte" in out.stdout
    record = json.loads(out.stdout[out.stdout.index("{") :])
    assert record["format"] == "seal-v1"
    assert len(record["signature"]) == 64
