"""Issue 17, items 1 and 15, where they were reported: a real ``vram-residency serve`` process.

* The README's ``audit verify ~/.local/state/vram-residency/audit.jsonl* --token-file ...`` on a
  fresh, clean log says OK (the glob also matches ``audit.jsonl.head``).
* Records cut from the end with the head deleted, then a restart of ``serve``: the restart no
  longer launders the cut, ``audit verify --require-head`` stays BROKEN (TAMPERED).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.audit.audit_helpers import read_lines

CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_once(state_home: Path) -> str:
    """Start a bare serve, wait until healthy, stop it with SIGINT; return its output."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_API_TOKEN_FILE", "CREDENTIALS_DIRECTORY")}
    env["XDG_STATE_HOME"] = str(state_home)
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--backend", "host"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited early with {proc.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("serve did not become healthy")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    return out


def _verify(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # What the shell makes of the README's glob: every file whose name starts with audit.jsonl.
    files = sorted(str(p) for p in state.glob("audit.jsonl*"))
    return subprocess.run(
        [*CLI, "audit", "verify", *files, "--token-file", str(state / "worker.token"), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_log_verifies_by_glob_and_a_restart_does_not_launder_a_cut(tmp_path: Path) -> None:
    state = tmp_path / "vram-residency"
    _serve_once(tmp_path)
    assert (state / "audit.jsonl.head").exists()
    clean = _verify(state, "--require-head")
    assert clean.returncode == 0 and "OK" in clean.stdout, clean.stdout + clean.stderr
    assert "skipped 1" in clean.stdout  # the head file, which the glob matched

    # The attack: cut the newest records, delete the head; --require-head notices ...
    log = state / "audit.jsonl"
    lines = read_lines(log)
    log.write_bytes(b"".join(lines[: len(lines) // 2]))
    (state / "audit.jsonl.head").unlink()
    assert _verify(state, "--require-head").returncode == 1

    # ... and a restart of serve must not turn that into OK.
    out = _serve_once(tmp_path)
    assert "SECURITY INCIDENT" in out and "audit head mismatch" in out, out
    after = _verify(state, "--require-head")
    assert after.returncode == 1 and "TAMPERED" in after.stdout, after.stdout + after.stderr
    events = [json.loads(line)["event"] for line in read_lines(log)]
    assert "AuditHeadMismatch" in events and "SecurityIncident" in events
