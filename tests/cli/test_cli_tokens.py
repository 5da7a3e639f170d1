"""The worker token never shows: not in errors, not in --help. The classic slip is giving the
token itself where its file is expected (``--token-file "$TOKEN"``): the error then named the
"file", printing the token into terminals and CI logs. Real processes."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.cli.cli_helpers import CLI, host_serve

TOKEN = secrets.token_urlsafe(32)


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WORKER_API_TOKEN_FILE"}
    env.update(PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "weights.bin"
    p.write_bytes(os.urandom(4096))
    return p


#: Tokens as people make them: URL-safe base64, hex, and base64 with '/', '+' and '='; and one
#: that starts with '-', as one URL-safe token in 64 does (``TOKEN`` itself may be one).
TOKENS = [TOKEN, secrets.token_hex(32), "q3/9+Zx0dG8vYmFzZTY0L3Rva2VuK3dpdGgvc2xhc2g=", "-" + TOKEN[1:]]


@pytest.mark.parametrize("command", ["seal", "attest", "audit", "digest", "serve"])
def test_a_token_given_as_its_file_is_not_echoed(tmp_path: Path, model: Path, command: str) -> None:
    args = {
        "seal": ["seal", "--backend", "host", "--token-file", TOKEN, str(model)],
        "attest": ["attest", "http://127.0.0.1:9", "--token-file", TOKEN],
        "audit": ["audit", "verify", str(model), "--token-file", TOKEN],
        "digest": ["digest", "-a", "nh-fast-v1", "--shard-id", "s", "--token-file", TOKEN, str(model)],
        "serve": [*host_serve(tmp_path), "--token-file", TOKEN],
    }[command]
    for token in TOKENS:
        out = run(*[token if a == TOKEN else a for a in args])
        text = out.stdout + out.stderr
        # A token that starts with '-' is an option to argparse, which then says the flag lacks
        # its argument (without the token); any other is taken as a path that does not exist.
        expected = "expected one argument" if token.startswith("-") else "does not exist"
        assert out.returncode != 0 and expected in text, text
        assert token not in text, text


def test_a_token_in_the_environment_variable_is_not_echoed(model: Path) -> None:
    out = run("seal", "--backend", "host", str(model), env_extra={"WORKER_API_TOKEN_FILE": TOKEN})
    assert out.returncode == 1 and "does not exist" in out.stderr, out.stderr
    assert TOKEN not in out.stdout + out.stderr


def test_a_real_path_is_still_named(tmp_path: Path, model: Path) -> None:
    missing = tmp_path / "worker-token"
    out = run("seal", "--backend", "host", "--token-file", str(missing), str(model))
    assert out.returncode == 1 and f"{missing} does not exist" in out.stderr, out.stderr
