"""Every command's file arguments, given what a careless or hostile operator gives: a FIFO nobody
writes to, ``/dev/zero``, a symlink to ``/dev/urandom``, a directory. Each must be refused at once
(one line on stderr or in the verdict, no traceback), never read forever or block on a writer.
Real processes; a command that hangs fails by its timeout."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli.cli_helpers import CLI, host_serve
from tests.cli.cli_helpers import run as run_cli

#: A refused file is refused before anything slow happens: far below this.
QUICK_S = 30


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=QUICK_S)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(secrets.token_urlsafe(32) + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture(params=["fifo", "dev-zero", "urandom-link"])
def endless(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A path whose reading never ends (or never starts)."""
    if request.param == "fifo":
        p = tmp_path / "fifo"
        os.mkfifo(p)
        return p
    if request.param == "dev-zero":
        return Path("/dev/zero")
    link = tmp_path / "weights.bin"
    link.symlink_to("/dev/urandom")
    return link


def refused(out: subprocess.CompletedProcess[str], rc: int, where: str = "stderr") -> None:
    # Joined: `audit show` prints through a console that wraps lines at the terminal width.
    text = " ".join((out.stderr if where == "stderr" else out.stdout).split())
    assert out.returncode == rc, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert "not a regular file" in text, (out.stdout, out.stderr)


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3"])
def test_digest_refuses_endless_files(endless: Path, algorithm: str) -> None:
    out = run("digest", "-a", algorithm, str(endless))
    refused(out, 1)
    assert out.stdout == ""


def test_digest_nh_fast_refuses_endless_files(endless: Path, token_file: Path) -> None:
    # /dev/zero has st_size 0: it was hashed as the empty file and a digest printed for it.
    out = run(
        "digest", "-a", "nh-fast-v1", "--token-file", str(token_file), "--shard-id", "shard-1", str(endless)
    )
    refused(out, 1)
    assert out.stdout == ""


def test_digest_nh_fast_sigint_exits_130_without_traceback(tmp_path: Path, token_file: Path) -> None:
    # A sparse file: seconds of hashing, no disk. Ctrl-C while the native hash runs used to end
    # in "BufferError: cannot close exported pointers exist" and exit 1.
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(8 << 30)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [*CLI, "digest", "-a", "nh-fast-v1", "--token-file", str(token_file), "--shard-id", "s", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(2.0)
    assert p.poll() is None, "finished before the signal: the file is too small for this machine"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and out == "", err


@pytest.mark.parametrize("option", ["--workers-file", "--seals", "--nonce-store"])
def test_attest_refuses_endless_files(endless: Path, token_file: Path, option: str) -> None:
    # /dev/zero as --workers-file was read into memory until the kernel killed the process.
    out = run(
        "attest",
        "http://127.0.0.1:9",
        "--token-file",
        str(token_file),
        "--timeout",
        "1",
        option,
        str(endless),
    )
    refused(out, 2)  # usage: no worker was asked
    assert out.stdout == ""


def test_audit_verify_refuses_endless_logs(endless: Path, token_file: Path) -> None:
    # Exit 2: an unreadable log is a usage problem (the module's exit codes), not a broken log.
    refused(run("audit", "verify", str(endless), "--token-file", str(token_file)), 2, "stdout")


def test_audit_verify_directory_is_a_usage_problem_not_a_broken_log(tmp_path: Path, token_file: Path) -> None:
    # It said "BROKEN: ... file unreadable" and exited 1, the exit status of tampering.
    out = run("audit", "verify", str(tmp_path), "--token-file", str(token_file))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "BROKEN" not in out.stdout and "directory" in out.stdout.lower(), out.stdout


def test_audit_verify_refuses_endless_anchor(endless: Path, tmp_path: Path, token_file: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"")
    refused(
        run("audit", "verify", str(log), "--token-file", str(token_file), "--anchor", str(endless)),
        2,
        "stdout",
    )


def test_audit_show_refuses_endless_logs(endless: Path) -> None:
    refused(run("audit", "show", str(endless)), 2, "stdout")


def test_serve_refuses_endless_config(endless: Path, tmp_path: Path) -> None:
    out = run("serve", "--config", str(endless), "--port", "0", "--state-dir", str(tmp_path / "state"))
    refused(out, 1)


def test_audit_verify_head_file_fifo_is_refused_not_waited_on(tmp_path: Path, token_file: Path) -> None:
    # The signed head beside the log (``audit.jsonl.head``) is read too: a FIFO there blocked.
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"")
    os.mkfifo(tmp_path / "audit.jsonl.head")
    out = run("audit", "verify", str(log), "--token-file", str(token_file))
    assert "Traceback" not in out.stderr and "not a regular file" in out.stdout, (out.stdout, out.stderr)


def test_serve_refuses_endless_commit_signing_key(endless: Path, tmp_path: Path) -> None:
    # /dev/zero was read until the kernel killed the worker; a FIFO held its start forever.
    out = run(*host_serve(tmp_path / "state"), "--commit-signing-key", str(endless))
    refused(out, 1)
