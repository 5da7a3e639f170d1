"""``vram_residency._tokenfile.read_token_file``, the one token reader of every command: one
stripping policy (a token ``serve`` reads is the token ``audit verify`` reads), symlinks followed,
FIFOs and other non-regular files refused without blocking, loose permissions and bad content
refused with a ConfigError that never shows the file's content."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.audit.audit_helpers import TOKEN, run_cli, write_records, write_token_file
from vram_residency._tokenfile import read_token_file
from vram_residency.audit.cli import EXIT_OK, EXIT_USAGE
from vram_residency.errors import ConfigError


def test_one_stripping_policy_trailing_spaces_verify(tmp_path: Path) -> None:
    tok = write_token_file(tmp_path, TOKEN + "  \t\r\n")
    assert read_token_file(tok) == TOKEN
    path = tmp_path / "audit.jsonl"
    write_records(path, 3)  # written under the stripped token, as serve uses it
    res = run_cli("audit", "verify", path, "--token-file", tok)
    assert res.returncode == EXIT_OK, res.stdout + res.stderr


def test_a_fifo_token_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo, 0o600)
    path = tmp_path / "audit.jsonl"
    write_records(path, 1)
    res = run_cli("audit", "verify", path, "--token-file", fifo, timeout=30)  # used to hang forever
    assert res.returncode == EXIT_USAGE and "not a regular file" in res.stdout, res.stdout + res.stderr
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(result, fifo), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and isinstance(result[0], ConfigError)


def _catch(out: list[BaseException], path: Path) -> None:
    try:
        read_token_file(path)
    except BaseException as exc:
        out.append(exc)


def test_token_file_policy(tmp_path: Path) -> None:
    good = write_token_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(good)
    assert read_token_file(link) == TOKEN  # k8s secrets and systemd credentials are symlinks
    for text, why in [("", "empty"), ("  \n", "empty"), ("a b" + "c" * 40, "whitespace"), ("tiny1", "short")]:
        with pytest.raises(ConfigError, match=why) as info:
            read_token_file(write_token_file(tmp_path, text, name=f"t{len(text)}"))
        assert text.strip() == "" or text not in str(info.value)
    loose = write_token_file(tmp_path, name="loose")
    loose.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(loose)
    for special in (tmp_path, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="not a regular file"):
            read_token_file(special)
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "missing")
