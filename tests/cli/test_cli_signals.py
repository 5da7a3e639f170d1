"""SIGINT and SIGTERM during a long command: the command unwinds (device memory zeroed and freed
by the manager's ``with``, temporary files removed) and exits 130 or 143, without a traceback and
without half-written output. Real processes, signals sent while the work runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli.cli_helpers import CLI


@pytest.fixture
def big(tmp_path: Path) -> Path:
    # Sparse: seconds of work for any command, no disk.
    p = tmp_path / "big.bin"
    with p.open("wb") as f:
        f.truncate(6 << 30)
    return p


def interrupted(args: list[str], sig: signal.Signals, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    time.sleep(2.5)
    assert p.poll() is None, "finished before the signal: the file is too small for this machine"
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_seal_interrupted_exits_cleanly(
    tmp_path: Path, big: Path, token_file: Path, sig: signal.Signals, status: int
) -> None:
    # SIGTERM killed the process outright: no unwinding, so the manager never zeroed the memory
    # it had filled (on a GPU, the weights stayed in freed VRAM for the next allocation).
    rc, out, err = interrupted(
        ["seal", "--backend", "host", "--token-file", str(token_file), str(big)], sig, tmp_path
    )
    assert rc == status, (rc, err)
    assert out == "" and "Traceback" not in err, err


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_manifest_interrupted_writes_nothing(
    tmp_path: Path, big: Path, sig: signal.Signals, status: int
) -> None:
    rc, _, err = interrupted(
        ["manifest", "-a", "sha256-tree-v1", "-a", "blake3", "-o", "m.json", str(big)], sig, tmp_path
    )
    assert rc == status, (rc, err)
    assert "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]  # no manifest, no temp file
