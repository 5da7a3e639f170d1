"""The CLI as the tests run it: a real ``vram-residency`` process (``python -m``, so that the
tests use this tree's package whatever is on PATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``vram-residency ARGS`` to completion, its output captured as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def host_serve(state_dir: Path) -> list[str]:
    """``serve``'s arguments for a worker on the host emulation, on a free port, with its own
    state directory: what each CLI test of ``serve`` starts from."""
    return ["serve", "--backend", "host", "--port", "0", "--state-dir", str(state_dir)]
