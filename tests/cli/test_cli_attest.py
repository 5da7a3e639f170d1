"""``vram-residency attest``'s options given out-of-range values: a usage error (exit 2, one line
naming the option), never a traceback from deep inside urllib or int(). Real processes."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.cli.cli_helpers import CLI, run


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "1e308"),
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--max-delay-ms", "nan"),
        ("--max-delay-ms", "inf"),
        ("--max-delay-ms", "0"),
        ("--concurrency", "0"),
        ("--concurrency", "x"),
    ],
)
def test_attest_bad_numbers_are_usage_errors(tmp_path: Path, option: str, value: str) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32))
    token.chmod(0o600)
    out = run("attest", "http://127.0.0.1:9", "--token-file", str(token), option, value)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and option in out.stderr, out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/\u00e9",  # not ASCII: UnicodeEncodeError inside http.client
        "http://127.0.0.1:9/\udcff",  # a non-UTF-8 argument byte
        "http://127.0.0.1:9/a b",  # http.client.InvalidURL
        "http://127.0.0.1:9/\n",
        "http://[::1",  # ValueError: Invalid IPv6 URL
        "http://",
        "http://:9",
        "http://127.0.0.1:99999",
    ],
)
def test_attest_malformed_worker_urls_are_refused_by_name(tmp_path: Path, url: str) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32))
    token.chmod(0o600)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [*CLI, "attest", os.fsencode(url).decode("utf-8", "surrogateescape"), "--token-file", str(token)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "worker URL" in out.stderr, out.stderr
    assert out.stdout == ""


def test_attest_nonce_store_in_a_missing_directory_is_refused_before_any_worker_is_asked(
    tmp_path: Path,
) -> None:
    # It was found only when the first nonce was written, after a worker had been asked.
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32))
    token.chmod(0o600)
    store = tmp_path / "missing" / "nonces.jsonl"
    out = run("attest", "http://127.0.0.1:9", "--token-file", str(token), "--nonce-store", str(store))
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "--nonce-store" in out.stderr and "does not exist" in out.stderr and out.stdout == "", out.stderr
