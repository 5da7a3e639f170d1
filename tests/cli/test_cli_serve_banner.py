"""The ``curl`` line ``serve`` prints to try the worker: it works as printed, and the token stays
out of curl's argv (``ps`` and ``/proc/PID/cmdline`` show argv to every user of the machine).
Real processes: a real worker, the printed line run by ``sh``, the real curl, whose arguments a
wrapper records before running it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.service.serve_process import run_serve


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_printed_curl_line_works_and_keeps_the_token_out_of_argv(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    argv_log = tmp_path / "curl-argv"
    wrapper = bindir / "curl"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_log}\nexec {shutil.which("curl")} "$@"\n')
    wrapper.chmod(0o755)
    w = run_serve(tmp_path / "w")
    try:
        lines = w.log().splitlines()
        line = lines[lines.index("  try:") + 1].strip()
        out = subprocess.run(
            ["sh", "-c", line],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": f"{bindir}:/usr/bin:/bin"},
        )
    finally:
        assert w.stop() == 0
    assert "event: end" in out.stdout, (line, out.stdout, out.stderr)
    assert w.token not in argv_log.read_text(), argv_log.read_text()
