"""``vram-residency serve`` as a user runs it: a real process, a fresh state directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service_helpers import execute

from vram_residency.service.auth import fingerprint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(state_home: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_API_TOKEN_FILE", "CREDENTIALS_DIRECTORY")}
    env["XDG_STATE_HOME"] = str(state_home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vram_residency.cli.main", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    return proc, port


def _wait_healthy(proc: subprocess.Popen[str], port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become healthy")


def test_bare_serve_creates_a_token_and_serves_the_example(tmp_path: Path) -> None:
    proc, port = _start(tmp_path)
    try:
        _wait_healthy(proc, port)
        token_path = tmp_path / "vram-residency" / "worker.token"
        assert (token_path.stat().st_mode & 0o777) == 0o600
        token = token_path.read_text().strip()
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        )
        status, events = execute(client, prompt="hello world")
        assert status == 200 and events[-1][0] == "end"
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "HOST EMULATION" in out and "not VRAM" in out
    assert "no usable GPU was found" in out
    assert "all-minilm-l6-v2" in out and "EMBEDDING model" in out
    assert str(token_path) in out and "created now, mode 0600" in out
    assert f"fingerprint {fingerprint(token.encode())}" in out
    assert token not in out
    assert "listening:  http://127.0.0.1:" in out
    assert "stopped (shards zeroed and freed)" in out
    assert (tmp_path / "vram-residency" / "audit.jsonl").is_file()

    # A second start reuses the same token file.
    proc, port = _start(tmp_path)
    try:
        _wait_healthy(proc, port)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "existing, mode 0600" in out and token not in out


def test_serve_refuses_a_readable_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123456789\n")
    token_file.chmod(0o644)
    proc, _ = _start(tmp_path, "--token-file", str(token_file))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "must not be accessible by group or others" in out
    assert "listening" not in out
    assert "0123456789abcdef0123456789" not in out
