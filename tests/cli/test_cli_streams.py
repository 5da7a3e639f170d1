"""Where the commands write: results on stdout, everything else on stderr; a result that cannot be
written is an error, never a silent success. Real processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.cli.cli_helpers import CLI, run


def run_closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    # `cmd >&-`: file descriptor 1 closed; Python then has sys.stdout = None and print() to it
    # does nothing at all.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *CLI, *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "weights.bin"
    p.write_bytes(os.urandom(4096))
    return p


def test_digest_with_stdout_closed_fails_instead_of_losing_the_digest(model: Path) -> None:
    # It exited 0 having printed nothing anywhere.
    out = run_closed_stdout("digest", str(model))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "standard output is closed" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_seal_with_stdout_closed_is_one_line_not_a_traceback(model: Path, token_file: Path) -> None:
    # It sealed, then died in json.dump with AttributeError: 'NoneType' object has no attribute 'write'.
    out = run_closed_stdout("seal", "--backend", "host", "--token-file", str(token_file), str(model))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "standard output is closed" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_seal_json_on_stdout_is_clean_with_verbose_logging(model: Path, token_file: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [*CLI, "-v", "seal", "--backend", "host", "--token-file", str(token_file), str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # nothing but the JSON document
    assert doc["verified"] is True and len(doc["records"]) == 1
    assert "backend:" in out.stderr


FORGED = "0" * 64 + "  sha256-tree-v1  passwd"


@pytest.mark.parametrize("command", [["digest"], ["digest", "-a", "nh-fast-v1"], ["manifest"]])
def test_a_file_name_cannot_forge_a_digest_line(tmp_path: Path, token_file: Path, command: list[str]) -> None:
    # "evil\n<64 zeros>  sha256-tree-v1  passwd" printed a second, forged line. As sha256sum does:
    # a name with a backslash, CR or LF is escaped and its line starts with a backslash.
    evil = tmp_path / f"evil\\\r\n{FORGED}"
    evil.write_bytes(os.urandom(100))
    extra: list[str] = []
    if "nh-fast-v1" in command:
        extra = ["--token-file", str(token_file), "--shard-id", "shard-1"]
    elif command == ["manifest"]:
        extra = ["-o", str(tmp_path / "m.json")]
    out = run(*command, *extra, str(evil))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert not any(line.startswith("0" * 64) for line in lines), out.stdout
    first = lines[0]
    assert first.startswith("\\") and first.endswith("evil\\\\\\r\\n" + FORGED), first


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3"])
def test_a_non_utf8_file_name_is_printed_as_its_bytes(tmp_path: Path, algorithm: str) -> None:
    # Under a UTF-8 locale other than C/POSIX (here forced with PYTHONIOENCODING) Python's stdout
    # is strict: the name's undecodable byte was a UnicodeEncodeError traceback. As coreutils do,
    # the name's own bytes are written back. (A manifest refuses such names: they are not text.)
    name = os.fsencode(str(tmp_path)) + b"/bad\xffname.bin"
    with open(name, "wb") as f:
        f.write(os.urandom(100))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    out = subprocess.run([*CLI, "digest", "-a", algorithm, name], capture_output=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout.endswith(b"/bad\xffname.bin\n"), out.stdout


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["-a", "nh-fast-v1"], "give --token-file and --shard-id"),
        (["-a", "nh-fast-v1", "--shard-id", "s"], "give --token-file and --shard-id"),
        (["-a", "blake3", "--shard-id", "s"], "apply to --algorithm nh-fast-v1 only"),
        (["-a", "nh-fast-v1", "--shard-id", "s", "TOKEN", "EXTRA"], "exactly one FILE"),
    ],
)
def test_digest_options_that_do_not_go_together_are_a_usage_error(
    tmp_path: Path, token_file: Path, options: list[str], fragment: str
) -> None:
    # The CLI's help: "2 usage: a bad option or value". These were InvalidInput, exit 1, which
    # the help keeps for a digest that could not be made or a file refused.
    model = tmp_path / "m.bin"
    model.write_bytes(os.urandom(100))
    args = [a for a in options if a not in ("TOKEN", "EXTRA")]
    if "TOKEN" in options:
        args += ["--token-file", str(token_file)]
    files = [str(model), str(model)] if "EXTRA" in options else [str(model)]
    out = run("digest", *args, *files)
    assert out.returncode == 2 and fragment in out.stderr and out.stdout == "", out.stderr
