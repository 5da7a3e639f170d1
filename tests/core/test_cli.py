"""The command line, run as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_out_of_range_options_are_usage_errors_not_tracebacks(tmp_path: Path) -> None:
    """Issue 17 item 12 (the commands other than serve): one line naming the option, exit 2."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    cases = [
        (["demo", "--size-mib", "-1"], "--size-mib"),
        (["demo", "--size-mib", "nan"], "--size-mib"),
        (["demo", "--size-mib", "1e30"], "--size-mib"),
        (["demo", "--device", "-1"], "--device"),
        (["seal", str(f), "--device", "-5"], "--device"),
        (["seal", str(f), "--staging-mib", "0"], "--staging-mib"),
        (["digest", str(f), "--manifest", "/proc/x/out.json"], "--manifest"),
        (["manifest", str(f), "-o", "/proc/x/out.json"], "--out"),
        (["manifest", str(f), "-o", str(tmp_path)], "--out"),
    ]
    for args, option in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert option in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_os_errors_are_one_line(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    # /proc exists and root may write to it by its mode, but no file can be created there.
    out = run("manifest", str(f), "-o", "/proc/vram-residency-test.json")
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") <= 3 and "vram-residency" in out.stderr


# ------------------------------------------------------------------ dev.py (issue 17, 16-17)

REPO = Path(__file__).resolve().parents[2]
DEV = [sys.executable, str(REPO / "dev.py")]

_TRAP = """
import os, signal, sys, time
out = sys.argv[1]
def got(signo, frame):
    with open(out, "a") as f:
        f.write(signal.Signals(signo).name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGINT, got)
signal.signal(signal.SIGTERM, got)
with open(out + ".pid", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def test_dev_run_without_a_command_prints_usage() -> None:
    out = subprocess.run([*DEV, "run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr and "Traceback" not in out.stderr


def test_dev_run_runs_in_the_users_directory(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"abc" * 1000)
    out = subprocess.run(
        [*DEV, "run", "vram-residency", "digest", "./model.bin"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == digest(b"abc" * 1000, "sha256-tree-v1").hex()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_dev_forwards_signals_and_waits(tmp_path: Path, sig: signal.Signals) -> None:
    log = tmp_path / "got"
    # A session of its own, like a service manager's: no terminal delivers anything to the child,
    # so whatever the child gets came through dev.py.
    dev = subprocess.Popen(
        [*DEV, "run", sys.executable, "-c", _TRAP, str(log)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pid_file = Path(str(log) + ".pid")
    try:
        deadline = time.monotonic() + 240
        while not pid_file.exists() or not pid_file.read_text():
            assert dev.poll() is None and time.monotonic() < deadline, "child did not start"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(dev.pid, sig)
        out, _ = dev.communicate(timeout=60)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
    assert log.read_text() == sig.name + "\n", out  # the child got it, once
    assert dev.returncode == 0, out  # dev.py waited for the child and passed on its status
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # no orphan left behind
