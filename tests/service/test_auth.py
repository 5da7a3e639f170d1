"""The worker token file: where it is found, what is refused, and that it never leaks."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.service.service_helpers import Running, execute, write_token
from vram_residency.errors import ConfigError
from vram_residency.service.auth import (
    BearerCheck,
    TokenOrigin,
    create_token_file,
    find_token_file,
    fingerprint,
    read_token_file,
)
from vram_residency.service.server import ServeOptions, build


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKER_API_TOKEN_FILE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_read_a_good_token_file(tmp_path: Path) -> None:
    p = tmp_path / "t"
    token = write_token(p)
    assert read_token_file(p) == token.encode()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620, 0o602, 0o610])
def test_group_or_other_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "t"
    token = write_token(p)
    os.chmod(p, mode)
    with pytest.raises(ConfigError, match="must not be accessible by group or others") as info:
        read_token_file(p)
    assert token not in str(info.value)


def test_missing_empty_short_and_odd_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(empty)
    blank = tmp_path / "blank"
    blank.write_text("  \n\n")
    blank.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(blank)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="too short"):
        read_token_file(short)
    spaced = tmp_path / "spaced"
    spaced.write_text("a token with spaces in it\n")
    spaced.chmod(0o600)
    with pytest.raises(ConfigError, match="printable ASCII"):
        read_token_file(spaced)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(tmp_path)


def test_where_the_token_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    src = find_token_file(None, state)
    assert src.origin is TokenOrigin.STATE_DIR and src.may_create
    assert src.path == state / "worker.token"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    src = find_token_file(None, state)
    assert src.origin is TokenOrigin.CREDENTIALS and not src.may_create
    assert src.path == tmp_path / "creds" / "worker_api_token"
    monkeypatch.setenv("WORKER_API_TOKEN_FILE", str(tmp_path / "env.token"))
    src = find_token_file(None, state)
    assert src.origin is TokenOrigin.ENVIRONMENT and src.path == tmp_path / "env.token"
    src = find_token_file(tmp_path / "arg.token", state)
    assert src.origin is TokenOrigin.ARGUMENT and src.path == tmp_path / "arg.token"


def test_created_token_file_is_private(tmp_path: Path) -> None:
    p = tmp_path / "new" / "worker.token"
    token = create_token_file(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert read_token_file(p) == token
    with pytest.raises(FileExistsError):
        create_token_file(p)  # never overwritten


def test_bearer_check() -> None:
    check = BearerCheck(b"0123456789abcdef0123")
    assert check.check_header("Bearer 0123456789abcdef0123")
    assert check.check_header("bearer 0123456789abcdef0123")
    assert not check.check_header("Bearer 0123456789abcdef012")
    assert not check.check_header("Bearer 0123456789abcdef01234")
    assert not check.check_header("Basic 0123456789abcdef0123")
    assert not check.check_header(None)
    assert "0123456789" not in repr(check)
    assert len(fingerprint(b"0123456789abcdef0123")) == 8


def test_service_refuses_to_start_without_a_good_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = {
        "state_dir": tmp_path / "s",
        "audit_log": tmp_path / "a.jsonl",
        "backend": "host",
        "scrub_interval": 0,
    }
    with pytest.raises(ConfigError, match="does not exist"):
        build(ServeOptions(token_file=tmp_path / "missing", **opts))  # type: ignore[arg-type]
    loose = tmp_path / "loose"
    write_token(loose)
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        build(ServeOptions(token_file=loose, **opts))  # type: ignore[arg-type]
    monkeypatch.setenv("WORKER_API_TOKEN_FILE", str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="does not exist"):
        build(ServeOptions(**opts))  # type: ignore[arg-type]
    # An explicit or environment token file is never created on the user's behalf.
    assert not (tmp_path / "nothing-here").exists()


def test_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    token = write_token(creds / "worker_api_token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    built = build(
        ServeOptions(
            state_dir=tmp_path / "s", audit_log=tmp_path / "a.jsonl", backend="host", scrub_interval=0
        )
    )
    try:
        assert built.token_source.origin is TokenOrigin.CREDENTIALS
        assert built.token_fingerprint == fingerprint(token.encode())
    finally:
        built.worker.close()


def test_token_never_appears_in_logs_responses_or_audit(
    worker_factory: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    w = worker_factory(access_log=True)
    token = w.token
    texts: list[str] = []
    for headers in ({}, {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Basic {token}"}):
        texts.append(httpx.get(w.url + "/worker/ready", headers=headers).text)
    texts.append(w.client.get("/worker/ready").text)
    texts.append(str(execute(w.client, prompt="hello")[1]))
    texts.append(httpx.get(w.url + "/metrics").text)
    texts.append(httpx.get(w.url + "/health").text)
    texts.append(w.client.post("/worker/commit", json={"model": "nope"}).text)
    texts.append(repr(w.worker) + repr(w.built) + repr(w.worker.manager))
    path = w.audit_path
    w.close()
    out = capsys.readouterr()
    texts += [caplog.text, out.out, out.err, path.read_text()]
    for t in texts:
        assert token not in t
